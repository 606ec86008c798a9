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
