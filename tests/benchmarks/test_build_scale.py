"""benchmarks/build_scale.py: the percentile distance it reports, by hand."""

from __future__ import annotations

import numpy as np

from benchmarks.build_scale import kolmogorov


def test_kolmogorov_distance_in_percentile_points():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert kolmogorov(a, a) == 0.0
    # at x = 2: F_a = 2/4, F_b = 2/2 -> 50 points
    assert kolmogorov(a, np.array([1.0, 2.0])) == 50.0
    # a sample of the set: at x = 3 (right), F_a = 3/4 and F_b = 1/2 -> 25 points
    assert kolmogorov(a, np.array([1.0, 4.0])) == 25.0


def test_default_and_no_clean_builds_side_by_side(tmp_path, capsys):
    """A small run: both builds of the same rows; the default (auto) removes planted far
    clusters (most of them: at 64-d, root4-l2 brings some near the mixture) and few others,
    --no-clean nothing; the table gives both and their ratio."""
    from benchmarks.build_scale import main

    rows = main(["--sizes", "2000", "--dim", "64", "--impurity", "0.05", "--out",
                 str(tmp_path)])
    r, n = rows[2000], 2000
    assert r["no_clean"]["cleaning"]["rule"] == "off"
    assert r["default"]["cleaning"]["rule"] == "auto"
    p = r["planted"]
    assert p["impure_removed"] >= 0.5 * p["impure"] > 0
    assert p["removed"] - p["impure_removed"] <= 0.02 * n
    assert p["removed"] == r["default"]["cleaning"]["removed"]
    out = capsys.readouterr().out
    assert "| 2,000 |" in out and "x |" in out
