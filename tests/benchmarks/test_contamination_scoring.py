"""benchmarks/contamination_scoring.py: the floored and mass-scale scores against
brute-force numpy and hand-computed cases."""

from __future__ import annotations

import numpy as np

from benchmarks.contamination_scoring import (
    empirical_p,
    floored_scores,
    mass_scores,
    neighbourhood,
    typicality,
)


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


def test_empirical_p_is_the_share_at_or_below():
    ref = np.array([3.0, 1.0, 2.0, 2.0])
    assert np.allclose(empirical_p(ref, np.array([0.5, 1.0, 2.0, 2.5, 9.0])),
                       [0.0, 0.25, 0.75, 0.75, 1.0])


def test_mass_scores_against_a_hand_computed_case():
    # Reference: the kept rows' own k = 2 scores l2 and K-th distances lK, 4 rows each.
    l2 = np.array([1.0, 2.0, 3.0, 4.0])
    lK = np.array([10.0, 20.0, 30.0, 40.0])
    # a: ordinary (p2 0.5, pK 0.5); b: close at k = 2 but a far K-th neighbour, the
    # surviving-impurity case (p2 0.25, pK 1.0); c: far at k = 2 (p2 1.0, pK 0.25).
    d2 = np.array([2.0, 1.0, 5.0])
    dK = np.array([25.0, 50.0, 15.0])
    got = mass_scores(d2, dK, l2, lK, 0.0)
    assert np.allclose(got, [0.5, 1.0, 1.0], atol=1e-8)
    # tau = 0.5: pK counts only above its median, rescaled: (0.5-0.5)/0.5 = 0, (1-0.5)/0.5 = 1
    got = mass_scores(d2, dK, l2, lK, 0.5)
    assert np.allclose(got, [0.5, 1.0, 1.0], atol=1e-8)
    dK2 = np.array([35.0, 35.0, 35.0])                     # pK 0.75 -> 0.5 at tau 0.5
    assert np.allclose(mass_scores(d2, dK2, l2, lK, 0.5), [0.5, 0.5, 1.0], atol=1e-8)
    # ties in p are broken by the k = 2 score: c (d2 5) above b (d2 1), both at p 1.0
    assert got[2] > got[1]
    # the tie-break never reorders different p-values: a (p 0.5 from pK, small d2) stays
    # above b (p 0.25 from p2, three times a's d2)
    a, b = mass_scores(np.array([0.5, 1.5]), np.array([25.0, 0.0]), l2, lK, 0.0)
    assert a > b
