"""dn2ops.index.knn against an independent brute-force numpy reference."""

import itertools

import faiss
import numpy as np
import pytest

import dn2ops.index.knn as knn_mod
from dn2ops.index.knn import (
    FlatShard,
    as_float32,
    kmeans_centroids,
    knn,
    knn_leave_one_out,
    knn_sharded,
    set_faiss_threads,
)
from tests.conftest import brute_dists, brute_knn


def assert_consistent(D, I, R):
    """Returned ids are distinct and their true distances are the returned D."""
    for row in I:
        assert len(set(row.tolist())) == len(row)
    np.testing.assert_allclose(
        D, np.take_along_axis(R, I, axis=1), rtol=1e-4, atol=1e-5
    )


def gaussian(n, d, seed, shift=0.0):
    # A large common offset mimics non-negative CNN features and exercises
    # the float32 cancellation that the re-ranking in knn() guards against.
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) + shift).astype(np.float32)


def with_duplicates_and_ties(seed):
    """Integer grid points (many exact distance ties) plus exact duplicates."""
    rng = np.random.default_rng(seed)
    xb = rng.integers(0, 3, size=(120, 4)).astype(np.float32)
    xb = np.vstack([xb, xb[:10], np.repeat(xb[10:11], 8, axis=0)])
    xq = np.vstack([xb[:15], rng.integers(0, 3, size=(30, 4)).astype(np.float32)])
    return xq, xb


# -- as_float32 / set_faiss_threads -------------------------------------------


def test_as_float32_converts_and_keeps_good_arrays():
    x = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    y = as_float32(x)
    assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == (3, 4)
    z = np.zeros((2, 3), dtype=np.float32)
    assert as_float32(z) is z


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros(3), "2-D"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.zeros((2, 0)), "at least one feature"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[1.0, np.inf]]), "NaN or infinite"),
        (np.array([[1e40]]), "infinite"),  # overflows float32
        (np.array([["a"]]), "real numbers"),
    ],
)
def test_as_float32_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        as_float32(bad)


def test_set_faiss_threads():
    before = faiss.omp_get_max_threads()
    try:
        set_faiss_threads(1)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            set_faiss_threads(bad)


# -- knn -----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_knn_matches_brute_force(k):
    xb = gaussian(2000, 48, seed=0, shift=30.0)
    xq = gaussian(300, 48, seed=1, shift=30.0)
    D, I = knn(xq, xb, k)
    assert D.dtype == np.float32 and I.dtype == np.int64
    assert D.shape == I.shape == (300, k)
    Dref, Iref = brute_knn(xq, xb, k)
    np.testing.assert_allclose(D, Dref, rtol=1e-4)
    # Continuous random data has no ties, so the ids must agree too.
    np.testing.assert_array_equal(I, Iref)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_knn_with_ties_and_duplicates(k):
    xq, xb = with_duplicates_and_ties(seed=k)
    D, I = knn(xq, xb, k)
    R = brute_dists(xq, xb)
    # With ties the ids are not unique; compare the sorted distances.
    np.testing.assert_allclose(D, np.sort(R, axis=1)[:, :k], rtol=1e-4, atol=1e-6)
    assert_consistent(D, I, R)
    # Queries copied from xb have an exact-zero nearest distance.
    assert (D[:15, 0] == 0).all()


def test_knn_duplicates_are_exactly_zero_in_blas_regime():
    # Raw IndexFlatL2 returns ~0.5 instead of 0 for duplicates at this size
    # (BLAS norm expansion in float32); the exact re-ranking must fix that.
    x = gaussian(3000, 256, seed=2, shift=50.0)
    x[1500:1600] = x[:100]
    D, I = knn(x, x, 2)
    assert (D[:, 0] == 0).all()
    assert (D[:100, 1] == 0).all() and (D[1500:1600, 1] == 0).all()
    np.testing.assert_array_equal(np.sort(I[:100], axis=1)[:, 1] - 1500, np.arange(100))


def test_knn_errors():
    xb = gaussian(4, 3, seed=0)
    with pytest.raises(ValueError, match=r"k=5 is larger than the number of .*\(4\)"):
        knn(xb, xb, 5)
    with pytest.raises(ValueError, match="positive integer"):
        knn(xb, xb, 0)
    with pytest.raises(ValueError, match="xq has 2 features but xb has 3"):
        knn(np.zeros((1, 2)), xb, 1)
    with pytest.raises(ValueError, match="NaN"):
        knn(np.full((1, 3), np.nan), xb, 1)


# -- knn_sharded -----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_knn_sharded_equals_concatenation(k):
    xb = gaussian(700, 24, seed=3, shift=10.0)
    xq = gaussian(80, 24, seed=4, shift=10.0)
    # Unequal shards, one smaller than k, passed as a generator (streaming).
    bounds = [0, 3, 400, 700]
    shards = (xb[a:b] for a, b in itertools.pairwise(bounds))
    D, I = knn_sharded(xq, shards, k)
    Dc, Ic = knn(xq, xb, k)
    np.testing.assert_allclose(D, Dc, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(I, Ic)


def test_knn_sharded_ties_and_mixed_shard_types():
    xq, xb = with_duplicates_and_ties(seed=7)
    k = 5
    idx = faiss.IndexFlatL2(xb.shape[1])
    idx.add(xb[50:100])
    shards = [xb[:50], idx, xb[100:]]
    D, I = knn_sharded(xq, shards, k, offsets=[0, 50, 100])
    R = brute_dists(xq, xb)
    np.testing.assert_allclose(D, np.sort(R, axis=1)[:, :k], rtol=1e-4, atol=1e-3)
    assert_consistent(D, I, R)


def test_knn_sharded_explicit_offsets_and_empty_shard():
    xb = gaussian(60, 8, seed=5)
    xq = gaussian(10, 8, seed=6)
    D, I = knn_sharded(xq, [xb[:30], xb[:0], xb[30:]], 3, offsets=[1000, 0, 2000])
    Dc, Ic = knn(xq, xb, 3)
    np.testing.assert_allclose(D, Dc, rtol=1e-5)
    expected = np.where(Ic < 30, Ic + 1000, Ic - 30 + 2000)
    np.testing.assert_array_equal(I, expected)


@pytest.mark.parametrize("offsets", [None, [0, 40, 80, 120]])
@pytest.mark.parametrize("flat", [False, True])
def test_knn_sharded_lets_each_streamed_shard_go_before_the_next_is_made(offsets, flat):
    """Shards loaded from files one at a time: when the generator makes the next shard,
    the one before is no longer held by the search (one shard in memory, not two)."""
    import weakref

    rng = np.random.default_rng(3)
    X = rng.normal(size=(160, 6)).astype(np.float32)
    xq = rng.normal(size=(9, 6)).astype(np.float32)
    made, alive_at_make = [], []

    def load():
        for a in range(0, 160, 40):
            alive_at_make.append(sum(r() is not None for r in made))
            shard = FlatShard(X[a:a + 40].copy()) if flat else X[a:a + 40].copy()
            made.append(weakref.ref(shard))
            yield shard
            del shard

    D, I = knn_sharded(xq, load(), 3, offsets)
    assert alive_at_make == [0, 0, 0, 0]
    D_ref, I_ref = brute_knn(xq, X, 3)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5)


def test_knn_sharded_errors():
    xb = gaussian(6, 4, seed=0)
    with pytest.raises(ValueError, match=r"k=7 is larger .* all shards \(6\)"):
        knn_sharded(xb, [xb[:3], xb[3:]], 7)
    with pytest.raises(ValueError, match="fewer entries than shards"):
        knn_sharded(xb, [xb[:3], xb[3:]], 1, offsets=[0])
    with pytest.raises(ValueError, match="more entries than shards"):
        knn_sharded(xb, [xb[:3], xb[3:]], 1, offsets=[0, 3, 6])
    with pytest.raises(ValueError, match="shard 1"):
        knn_sharded(xb, [xb, np.zeros((2, 5), dtype=np.float32)], 1)
    ip = faiss.IndexFlatIP(4)
    ip.add(xb)
    with pytest.raises(ValueError, match="METRIC_L2"):
        knn_sharded(xb, [ip], 1)


# -- knn_leave_one_out -------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_leave_one_out_matches_brute_force(k):
    x = gaussian(400, 16, seed=8, shift=20.0)
    D, I = knn_leave_one_out(x, k)
    assert D.shape == I.shape == (400, k)
    R = brute_dists(x, x)
    np.fill_diagonal(R, np.inf)
    assert (I != np.arange(400)[:, None]).all()
    np.testing.assert_allclose(D, np.sort(R, axis=1)[:, :k], rtol=1e-4)
    np.testing.assert_array_equal(I, np.argsort(R, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("k", [1, 2, 5])
def test_leave_one_out_with_duplicates_never_returns_self(k):
    _, x = with_duplicates_and_ties(seed=10 + k)
    n = len(x)
    D, I = knn_leave_one_out(x, k)
    assert (I != np.arange(n)[:, None]).all()
    R = brute_dists(x, x)
    np.fill_diagonal(R, np.inf)
    np.testing.assert_allclose(D, np.sort(R, axis=1)[:, :k], rtol=1e-4, atol=1e-6)
    assert_consistent(D, I, R)
    # Rows 120..129 duplicate rows 0..9 under other ids: legitimate distance 0.
    assert (D[120:130, 0] == 0).all() and (D[:10, 0] == 0).all()


def test_leave_one_out_drops_last_column_when_self_missing(monkeypatch):
    # Force the rare case where the own id is pushed out of the k+1 results
    # by more than k exact duplicates.
    def fake_search(self, xq, k):
        I = np.array([[1, 2, 3], [1, 0, 2], [0, 1, 3], [3, 2, 1]], dtype=np.int64)
        D = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 2]], dtype=np.float32)
        return D, I

    monkeypatch.setattr(knn_mod.FlatShard, "search", fake_search)
    D, I = knn_leave_one_out(np.zeros((4, 2)), 2)
    np.testing.assert_array_equal(I, [[1, 2], [0, 2], [0, 1], [2, 1]])
    np.testing.assert_array_equal(D, [[0, 0], [0, 0], [0, 0], [1, 2]])


def test_leave_one_out_k_too_large():
    with pytest.raises(ValueError, match=r"k=3 is larger than the number of other"):
        knn_leave_one_out(gaussian(3, 2, seed=0), 3)


# -- kmeans_centroids ----------------------------------------------------------------


def test_kmeans_c_equals_n_gives_exact_1nn():
    xb = gaussian(60, 10, seed=11, shift=5.0)
    xq = gaussian(40, 10, seed=12, shift=5.0)
    C = kmeans_centroids(xb, len(xb))
    D, _ = knn(xq, C, 1)
    np.testing.assert_allclose(D[:, 0], brute_dists(xq, xb).min(axis=1), rtol=1e-5)


def test_kmeans_c1_is_the_mean():
    # 1000 > 256 points: faiss's default max_points_per_centroid would
    # subsample and miss the mean by ~0.1.
    xb = gaussian(1000, 8, seed=13, shift=3.0)
    C = kmeans_centroids(xb, 1)
    assert C.shape == (1, 8) and C.dtype == np.float32
    np.testing.assert_allclose(C[0], xb.astype(np.float64).mean(axis=0), atol=1e-4)


def test_kmeans_deterministic_and_errors():
    xb = gaussian(300, 6, seed=14)
    np.testing.assert_array_equal(
        kmeans_centroids(xb, 4, seed=3), kmeans_centroids(xb, 4, seed=3)
    )
    with pytest.raises(ValueError, match="larger than the number of points"):
        kmeans_centroids(xb[:3], 4)


def test_prebuilt_flat_shards_search_like_array_shards():
    from dn2ops.index.knn import FlatShard
    rng = np.random.default_rng(7)
    parts = [rng.normal(size=(n, 16)).astype(np.float32) + 5 for n in (40, 25, 33)]
    xq = rng.normal(size=(12, 16)).astype(np.float32) + 5
    D0, I0 = knn_sharded(xq, parts, 3)
    D1, I1 = knn_sharded(xq, [FlatShard(p) for p in parts], 3)
    np.testing.assert_array_equal(I0, I1)
    np.testing.assert_array_equal(D0, D1)
    d = np.linalg.norm(xq[:, None] - np.concatenate(parts)[None], axis=2)
    np.testing.assert_allclose(D1, np.sort(d, axis=1)[:, :3], rtol=1e-5)


def test_adopted_flat_shards_are_searched_in_place():
    import faiss

    from dn2ops.index.knn import FlatShard, flat_vectors
    rng = np.random.default_rng(8)
    xb = rng.normal(size=(50, 12)).astype(np.float32) + 30
    xq = np.concatenate([xb[:3], rng.normal(size=(5, 12)).astype(np.float32) + 30])
    index = faiss.IndexFlatL2(12)
    index.add(xb)
    shard = FlatShard.adopt(index)
    assert shard.index is index  # no copy: the index's own vectors were shifted
    np.testing.assert_allclose(flat_vectors(index), xb - xb.mean(axis=0), atol=1e-5)
    D, I = shard.search(xq, 2)
    d = np.linalg.norm(xq[:, None].astype(np.float64) - xb[None], axis=2)
    np.testing.assert_array_equal(I[:, 0], np.argsort(d, axis=1)[:, 0])
    np.testing.assert_allclose(D, np.sort(d, axis=1)[:, :2], rtol=1e-5)
    assert (D[:3, 0] == 0).all()  # a stored vector is its own neighbour at exactly 0
    empty = FlatShard.adopt(faiss.IndexFlatL2(12))
    assert len(empty) == 0 and not np.isnan(empty.shift).any()
    D, I = knn_sharded(xq, [empty, FlatShard(xb)], 2)
    np.testing.assert_allclose(D, np.sort(d, axis=1)[:, :2], rtol=1e-5)
