"""benchmarks/contamination_scoring.py: the floored score against brute-force numpy."""

from __future__ import annotations

import numpy as np

from benchmarks.contamination_scoring import floored_scores, neighbourhood, typicality


def test_floored_scores_against_a_hand_computed_case():
    # Kept rows on a line at 0, 1, 2 (a tight group) and 10 (a lone survivor).
    kept = np.array([[0.0], [1.0], [2.0], [10.0]])
    test = np.array([[1.5], [10.5]])
    d = np.abs(test - kept.T)                                   # brute force, (2, 4)
    I = np.argsort(d, axis=1, kind="stable")[:, :2]
    D = np.take_along_axis(d, I, axis=1)
    dk = np.abs(kept - kept.T) + np.diag([np.inf] * 4)
    Dl = np.sort(dk, axis=1)[:, :3]
    r = typicality(Dl, 2)                                       # mean to 2 nearest others
    assert np.allclose(r, [1.5, 1.0, 1.5, 8.5])
    got = floored_scores(D, I, r, 1.0)
    # 1.5: neighbours 1 (d 0.5, r 1.0) and 2 (d 0.5, r 1.5) -> (1.0 + 1.5) / 2
    # 10.5: neighbours 10 (d 0.5, r 8.5) and 2 (d 8.5, r 1.5) -> (8.5 + 8.5) / 2
    assert np.allclose(got, [1.25, 8.5])
    # a = 0: dn2's plain score, the mean distance to the 2 nearest
    assert np.allclose(floored_scores(D, I, r, 0.0), D.mean(axis=1))


def test_neighbourhood_sizes():
    assert neighbourhood("5%", 6000) == 300
    assert neighbourhood("5%", 100) == 10          # at least 10, as the auto cleaning
    assert neighbourhood("300", 106) == 105        # at most n - 1
