"""dn2ops.score.decisions: BH and alpha thresholds against brute force over explicit
p-values, the drift test on uniform, shifted and anomalous partitions, the decision."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dn2ops.index.calibration import Reference
from dn2ops.score import decisions


def brute_p(scores: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Rank p-values by counting: (1 + #{ref >= s}) / (n + 1)."""
    return np.array([(1 + np.sum(ref >= s)) / (len(ref) + 1) for s in scores])


def brute_bh(p: np.ndarray, q: float) -> np.ndarray:
    """Benjamini-Hochberg step-up, by its definition: the largest r with p_(r) <= q r / m,
    then every p <= p_(r)."""
    m = len(p)
    ps = sorted(p)
    for r in range(m, 0, -1):
        if ps[r - 1] <= q * r / m:
            return p <= ps[r - 1]
    return np.zeros(m, bool)


def _partition(seed: int, m: int, anomalies: float, ties: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = np.concatenate([rng.normal(size=m - int(anomalies * m)),
                        rng.normal(4.0, 1.0, int(anomalies * m))])
    return np.round(s, 1) if ties else s


@pytest.mark.parametrize("q", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("seed,anomalies,ties", [(0, 0.0, False), (1, 0.05, False),
                                                 (2, 0.3, True), (3, 0.5, False)])
def test_bh_threshold_equals_brute_force_bh_on_explicit_p_values(q, seed, anomalies, ties):
    rng = np.random.default_rng(100 + seed)
    ref = np.round(rng.normal(size=400), 1) if ties else rng.normal(size=400)
    reference = Reference.of(ref, tail=None)
    scores = _partition(seed, 300, anomalies, ties)
    threshold = decisions.bh_threshold(np.sort(scores), reference, q)
    expected = brute_bh(brute_p(scores, ref), q)
    np.testing.assert_array_equal(scores >= threshold, expected)
    assert math.isinf(threshold) == (not expected.any())
    np.testing.assert_array_equal(decisions.bh_flags(brute_p(scores, ref), q), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_bh_threshold_with_a_fitted_tail_equals_bh_on_the_references_p_values(seed):
    rng = np.random.default_rng(seed)
    reference = Reference.of(rng.gamma(2.0, 1.0, 2000))
    assert reference.tail is not None
    scores = np.concatenate([rng.gamma(2.0, 1.0, 500), rng.gamma(2.0, 1.0, 20) + 12])
    p, source = reference.p_values(scores)
    assert "tail" in set(source)
    threshold = decisions.bh_threshold(np.sort(scores), reference, 0.05)
    np.testing.assert_array_equal(scores >= threshold, brute_bh(p, 0.05))
    assert (scores >= threshold).sum() >= 20  # the planted ones, beyond the rank's reach


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.1])
def test_alpha_threshold_flags_exactly_p_at_most_alpha(alpha):
    rng = np.random.default_rng(7)
    ref = rng.normal(size=1000)
    scores = _partition(8, 500, 0.1, ties=True)
    threshold = decisions.alpha_threshold(np.sort(scores), Reference.of(ref, tail=None), alpha)
    np.testing.assert_array_equal(scores >= threshold, brute_p(scores, ref) <= alpha)


def test_thresholds_of_an_empty_or_normal_partition_flag_nothing():
    reference = Reference.of(np.arange(100.0), tail=None)
    for cut in (decisions.bh_threshold, decisions.alpha_threshold):
        assert cut(np.zeros(0), reference, 0.05) == math.inf
    assert decisions.bh_threshold(np.array([10.0, 50.0]), reference, 0.05) == math.inf


def test_drift_test_passes_uniform_p_values_and_fails_shifted_ones():
    rng = np.random.default_rng(11)
    uniform = rng.uniform(size=5000)
    ok = decisions.drift_test(uniform)
    assert not ok["warn"] and ok["pvalue"] > decisions.DRIFT_LEVEL
    assert ok["rows"] == int((uniform > 0.2).sum())
    assert (ok["lower"], ok["level"]) == (0.2, 0.001)
    shifted = 0.2 + 0.8 * rng.uniform(size=2000) ** 1.5  # normals pushed to smaller p
    bad = decisions.drift_test(shifted)
    assert bad["warn"] and bad["pvalue"] < 1e-6 and bad["statistic"] > 0.1
    # the reference's own sampling noise: a reference of 100 scores cannot tell as much
    assert decisions.drift_test(shifted, n_reference=100)["pvalue"] > bad["pvalue"]


def test_a_partition_half_anomalies_does_not_trip_the_drift_test():
    """Anomalies have small p; the test looks at p > 0.2 only."""
    rng = np.random.default_rng(12)
    ref = rng.normal(size=20_000)
    reference = Reference.of(ref)
    scores = np.concatenate([rng.normal(size=1000), rng.normal(6.0, 1.0, 1000)])
    p = reference.p_values(scores)[0]
    got = decisions.drift_test(p, n_reference=reference.n)
    assert not got["warn"] and got["rows"] < 1000
    moved = reference.p_values(rng.normal(0.5, 1.0, 1000))[0]  # the normals moved
    assert decisions.drift_test(moved, n_reference=reference.n)["warn"]


def test_drift_test_needs_enough_rows_above_the_cut():
    got = decisions.drift_test(np.full(49, 0.5))
    assert got["rows"] == 49 and got["statistic"] is None and got["pvalue"] is None
    assert not got["warn"]


def test_decide_reports_the_rule_threshold_count_and_drift():
    rng = np.random.default_rng(13)
    reference = Reference.of(rng.normal(size=5000))
    scores = np.sort(np.concatenate([rng.normal(size=995), rng.normal(8.0, 1.0, 5)]))
    got = decisions.decide(scores, reference, "fdr", 0.05)
    flags = got["flags"]
    assert flags["rule"] == "fdr" and flags["level"] == 0.05
    assert flags["flagged"] == int((scores >= flags["threshold"]).sum()) >= 5
    assert flags["p_value_floor"] == reference.floor == 0.0  # a tail: no floor
    assert flags["reference_n"] == 5000
    assert got["drift"]["warn"] is False and got["warnings"] == []
    none = decisions.decide(scores[:900], reference, "alpha", 1e-6)
    assert none["flags"]["flagged"] == 0 and none["flags"]["threshold"] is None


def test_a_reference_too_small_for_the_level_is_never_a_silent_flag_nothing():
    small = Reference.of(np.linspace(0.0, 1.0, 30), tail=None)  # floor 1/31
    assert small.tail is None
    scores = np.sort(np.concatenate([np.linspace(0.0, 1.0, 990), np.full(10, 50.0)]))
    got = decisions.decide(scores, small, "fdr", 0.05)
    (warning,) = got["warnings"]
    assert "lone anomaly cannot be flagged" in warning and "30 scores" in warning
    assert "no fitted tail" in warning
    assert got["flags"]["p_value_floor"] == pytest.approx(1 / 31)
    tiny = Reference.of(np.linspace(0.0, 1.0, 10), tail=None)  # floor 1/11 > 0.05
    got = decisions.decide(scores, tiny, "fdr", 0.05)
    assert got["flags"]["flagged"] == 0 and "nothing can be flagged" in got["warnings"][0]
    why = decisions.resolution_warning("alpha", 0.01, 1, small)
    assert why.startswith("--alpha 0.01 asks for p <= 0.01") and "--alpha >= 0.032" in why
    assert decisions.resolution_warning("alpha", 0.05, 1, small) is None
    assert decisions.resolution_warning("fdr", 0.05, 1, small) is None  # 0.05 > 1/31


def test_no_decision_says_why():
    got = decisions.no_decision("no normal sets")
    assert got == {"flags": {"rule": None, "why": "no normal sets"}, "drift": None,
                   "warnings": []}
