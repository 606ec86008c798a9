"""benchmarks/calibration.py's null table: exactly valid p-values and issue 28's goals."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.calibration import _goal_figures, _meets, exact_p


def test_exact_p_values_are_conformal_and_valid():
    rng = np.random.default_rng(0)
    n = 99
    draws = np.stack([exact_p(n, 500, rng) for _ in range(400)])  # 400 references
    # (1 + #{reference >= score}) / (n + 1): multiples of 1 / (n + 1) from 1 / (n + 1) to 1
    assert np.allclose(draws * (n + 1), np.round(draws * (n + 1)))
    assert draws.min() >= 1 / (n + 1) and draws.max() <= 1
    # Exchangeable scores: P(p <= a) = floor(a (n + 1)) / (n + 1) over references; the
    # standard error of this mean is about 0.001 (each reference moves its share by ~0.02).
    for a in (0.01, 0.05, 0.2):
        assert abs(np.mean(draws <= a) - np.floor(a * (n + 1)) / (n + 1)) < 0.005, a
    # One reference shared by its test scores: their shares differ from reference to
    # reference (a class's test normals share the class's reference too).
    assert np.std(np.mean(draws <= 0.05, axis=1)) > 0.01


@pytest.mark.parametrize("name, value, met", [
    ("share 0.001", 0.0007, False), ("share 0.001", 0.0011, True),
    ("share 0.1", 0.121, False), ("outside 0.1", 1.0, False), ("outside 0.01", 0.0, True),
    ("fdp 0.1 0.05", 0.0548, False), ("fdp 0.1 0.05", 0.05, True),
    ("power 0.1 0.1", 0.71, True), ("power 0.1 0.1", 0.69, False),
    ("power 0.5 0.05", 0.1, None)])
def test_the_goals_of_issue_28(name, value, met):
    assert _meets(name, value) is met


def test_goal_figures_against_hand_counts():
    # Two classes of 4 normals and anomalies with p-values chosen so that BH at Q = 0.5
    # over 4 normals + 1 anomaly rejects the anomaly and the normal at 0.2: FDP 1/2.
    pn = [np.array([0.2, 0.6, 0.8, 0.9]), np.array([0.3, 0.7, 0.8, 0.95])]
    pa = [np.array([0.01]), np.array([0.01])]
    got = _goal_figures(pn, pa, alphas=[0.25], fdr=[0.5], mix=[0.2], draws=1,
                        rng=np.random.default_rng(0))
    assert got["share 0.25"] == pytest.approx((1 / 4 + 0 / 4) / 2)
    # class 1: sorted p 0.01, 0.2, 0.6, ...: 0.2 <= 2/5 * 0.5 -> 2 rejected, 1 false;
    # class 2: 0.3 > 2/5 * 0.5 -> only the anomaly
    assert got["fdp 0.2 0.5"] == pytest.approx((1 / 2 + 0) / 2)
    assert got["power 0.2 0.5"] == pytest.approx(1.0)
