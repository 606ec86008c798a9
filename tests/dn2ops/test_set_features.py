import numpy as np
import pytest

from dn2ops.set_features import covtrace_score, pool_set, pool_sets


def test_covtrace_hand_computed():
    x = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])
    # column 0: mean 3, squared deviations 4+0+4 = 8, /(3-1) -> 4
    # column 1: mean 4, squared deviations 4+4+16 = 24, /(3-1) -> 12
    assert covtrace_score(x) == pytest.approx(16.0)
    assert covtrace_score(x) == pytest.approx(np.trace(np.cov(x, rowvar=False)))


def test_covtrace_identical_members_is_zero():
    x = np.tile(np.arange(5.0), (4, 1))
    assert covtrace_score(x) == 0.0


@pytest.mark.parametrize("m", [0, 1])
def test_covtrace_needs_two_members(m):
    with pytest.raises(ValueError, match="at least 2"):
        covtrace_score(np.ones((m, 3)))


def test_pool_set_mean_max_vs_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5)).astype(np.float32)
    np.testing.assert_allclose(pool_set(x, "mean"), x.mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(pool_set(x, "max"), x.max(axis=0))
    assert pool_set(x).dtype == np.float32
    assert pool_set(x).shape == (5,)


def test_pool_set_errors():
    with pytest.raises(ValueError, match="how"):
        pool_set(np.ones((2, 3)), "median")
    with pytest.raises(ValueError, match="empty"):
        pool_set(np.ones((0, 3)))
    with pytest.raises(ValueError, match="2-D"):
        pool_set(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        pool_set(np.array([[1.0, np.nan]]))


def test_pool_sets_ragged_sizes():
    rng = np.random.default_rng(1)
    sets = [rng.standard_normal((m, 4)) for m in (1, 3, 6)]
    out = pool_sets(sets, "max")
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out, np.stack([s.max(axis=0) for s in sets]), rtol=1e-6)
    out = pool_sets(sets, "mean")
    np.testing.assert_allclose(out, np.stack([s.mean(axis=0) for s in sets]), rtol=1e-5)


def test_pool_sets_errors():
    with pytest.raises(ValueError, match="empty"):
        pool_sets([])
    with pytest.raises(ValueError, match="same number of features"):
        pool_sets([np.ones((2, 3)), np.ones((2, 4))])
