"""benchmarks/index_add.py: the parent/added split it builds from, and a tiny flat run."""

from __future__ import annotations

import json

from benchmarks.index_add import main, nlist


def test_nlist_is_a_power_of_two_near_four_square_roots():
    assert nlist(100_000) == 1024  # 4 * 316 = 1265
    assert nlist(1_000_000) == 4096  # 4 * 1000
    assert nlist(3000) == 256  # 4 * 54.8 = 219


def test_a_flat_add_scores_as_the_fresh_build(tmp_path):
    res = main(["--normal", "400", "--added", "40", "--modes", "flat", "--out", str(tmp_path)])
    row = res["modes"]["flat"]
    assert row["max_abs_diff"] < 1e-5  # exact search over the same vectors
    parent = json.loads((tmp_path / "parent-features" / "_SUCCESS").read_text())
    added = json.loads((tmp_path / "added-features" / "_SUCCESS").read_text())
    assert [f["name"] for f in parent["committed_files"]] == ["features-00000-of-00002.parquet"]
    assert [f["name"] for f in added["committed_files"]] == ["features-00001-of-00002.parquet"]
    manifest = json.loads((tmp_path / "flat-add" / "_SUCCESS").read_text())
    assert manifest["counts"]["kept"] == 440 and manifest["added"]["images"] == 40
