"""dn2ops.score.set_features: pooling and the set summary (covtrace), against numpy and
values computed by hand."""

import pickle

import numpy as np
import pytest

from dn2ops.score.set_features import SetSummary, pool_set


def covtrace_by_numpy(x: np.ndarray) -> float:
    """Trace of the sample covariance (ddof=1) of the rows of x (m, d), d >= 2, by numpy."""
    return float(np.trace(np.cov(np.asarray(x, np.float64), rowvar=False)))


def test_covtrace_hand_computed():
    x = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])
    # column 0: mean 3, squared deviations 4+0+4 = 8, /(3-1) -> 4
    # column 1: mean 4, squared deviations 4+4+16 = 24, /(3-1) -> 12
    s = SetSummary.of(x, covtrace=True)
    assert s.covtrace() == pytest.approx(16.0)
    assert s.covtrace() == pytest.approx(covtrace_by_numpy(x))


def test_covtrace_identical_members_is_zero():
    x = np.tile(np.arange(5.0), (4, 1))
    assert SetSummary.of(x, covtrace=True).covtrace() == 0.0


def test_covtrace_needs_two_members():
    with pytest.raises(ValueError, match="at least 2"):
        SetSummary.of(np.ones((1, 3)), covtrace=True).covtrace()
    with pytest.raises(ValueError, match="at least 2"):
        SetSummary(covtrace=True).covtrace()  # no member
    with pytest.raises(ValueError, match="non-empty"):
        SetSummary.of(np.ones((0, 3)), covtrace=True)


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


def test_summaries_of_sets_of_different_sizes_pool_as_numpy():
    rng = np.random.default_rng(1)
    sets = [rng.standard_normal((m, 4)) for m in (1, 3, 6)]
    out = np.stack([SetSummary.of(s, "max").pooled("max") for s in sets])
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out, np.stack([s.max(axis=0) for s in sets]), rtol=1e-6)
    out = np.stack([SetSummary.of(s, "mean").pooled("mean") for s in sets])
    np.testing.assert_allclose(out, np.stack([s.mean(axis=0) for s in sets]), rtol=1e-5)


def _summarise(x, order, chunks, **kw):
    """SetSummary of x's rows taken one at a time in ``order``, in ``chunks`` partial
    summaries merged."""
    parts = [SetSummary(**kw) for _ in range(chunks)]
    for j, i in enumerate(order):
        parts[j % chunks].merge(SetSummary.of(x[[i]], **kw))
    out = parts[0]
    for p in parts[1:]:
        out.merge(pickle.loads(pickle.dumps(p)))  # as Beam ships accumulators
    return out


@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_set_summary_equals_the_whole_array_computations(chunks):
    rng = np.random.default_rng(3)
    # a large mean and a small spread: a per-dimension sum of squares would cancel
    x = (1000.0 + rng.standard_normal((40, 16))).astype(np.float32)
    s = _summarise(x, rng.permutation(len(x)), chunks, covtrace=True)
    ref = np.trace(np.cov(x.astype(np.float64), rowvar=False))
    assert s.count == 40
    assert s.covtrace() == pytest.approx(ref, rel=1e-9)
    assert s.covtrace() == pytest.approx(
        x.astype(np.float64).var(axis=0, ddof=1).sum(), rel=1e-9)
    mean = _summarise(x, rng.permutation(len(x)), chunks, pool="mean").pooled("mean")
    np.testing.assert_allclose(mean, pool_set(x, "mean"), rtol=1e-7)
    mx = _summarise(x, rng.permutation(len(x)), chunks, pool="max").pooled("max")
    np.testing.assert_array_equal(mx, pool_set(x, "max"))
    assert mean.dtype == mx.dtype == np.float32


def test_set_summary_hand_computed_and_empty_merges():
    x = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0]])
    s = SetSummary(covtrace=True).merge(SetSummary(covtrace=True))  # empty + empty
    for row in x:
        s.merge(SetSummary.of(row[None], covtrace=True))
    s.merge(SetSummary(covtrace=True))
    assert SetSummary(covtrace=True).merge(s).covtrace() == pytest.approx(16.0)  # see above
    assert s.covtrace() == pytest.approx(16.0)
    np.testing.assert_array_equal(s.mean, [3.0, 4.0])


def test_set_summary_refuses():
    one = SetSummary.of(np.ones((1, 3)), covtrace=True)
    with pytest.raises(ValueError, match="at least 2"):
        one.covtrace()
    with pytest.raises(ValueError, match="does not keep"):
        one.pooled("max")
    with pytest.raises(ValueError, match="does not keep"):
        SetSummary.of(np.ones((1, 3)), pool="max").covtrace()
    with pytest.raises(ValueError, match="empty"):
        SetSummary(pool="mean").pooled("mean")
    with pytest.raises(ValueError, match="NaN"):
        SetSummary.of(np.array([[1.0, np.nan]]), pool="mean")
    with pytest.raises(ValueError, match=r"\(m, d\)"):
        SetSummary.of(np.ones(3), pool="mean")
    with pytest.raises(ValueError, match="pool"):
        SetSummary(pool="median")
