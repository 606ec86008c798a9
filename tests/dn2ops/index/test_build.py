"""dn2ops.index: the streaming build and shard-at-a-time scoring, against in-memory references.

The references are independent of the streaming code: DN2Scorer.fit on the
whole array (itself tested against brute-force numpy in test_estimator.py),
dn2ops.index.knn.knn_leave_one_out, and brute-force numpy distances.
"""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from dn2ops.config import CLEAN_K, REFERENCE_SAMPLE, IndexConfig
from dn2ops.index import IndexError_, LoadedIndex, build_index, hnsw, ivf, streams
from dn2ops.index.calibration import fit_tail, tail_entry
from dn2ops.index.knn import knn_leave_one_out
from dn2ops.score.estimator import DN2Scorer
from tests.conftest import brute_loo_scores, brute_scores, clustered, write_features


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    X = clustered(300)
    uris = write_features(root / "feats", X, [120, 0, 100, 80])
    return root, X, uris


def normal_table(index_dir):
    return pq.read_table(f"{index_dir}/normal.parquet")


@pytest.mark.parametrize("shards", [1, 3, None])
def test_streaming_build_equals_in_memory_scorer(data, tmp_path, shards):
    root, X, uris = data
    m = build_index(str(root / "feats"), str(tmp_path / "i"), IndexConfig(k=2, shards=shards))
    ref = DN2Scorer(k=2).fit(X)
    t = normal_table(tmp_path / "i")
    assert t.column("uri").to_pylist() == uris
    np.testing.assert_allclose(t.column("loo_score").to_numpy(), ref.train_scores_, rtol=1e-5)
    assert m["shards"] == {1: 1, 3: 3, None: 3}[shards]  # None: one per non-empty feature shard
    # The shards hold the vectors, in order.
    loaded = LoadedIndex(str(tmp_path / "i"), device="cpu")
    np.testing.assert_array_equal(np.concatenate(list(loaded.iter_shards())), X)
    xq = clustered(40, seed=5)
    s, D, I = loaded.search(xq)
    np.testing.assert_allclose(s, ref.score_samples(xq), rtol=1e-5)
    np.testing.assert_allclose(s, brute_scores(xq, X, 2), rtol=1e-5)


def test_leave_one_out_by_streaming_equals_knn_leave_one_out(data, tmp_path):
    root, X, _ = data
    build_index(str(root / "feats"), str(tmp_path / "i"), IndexConfig(k=3, shards=4))
    D, _ = knn_leave_one_out(X, 3)
    np.testing.assert_allclose(normal_table(tmp_path / "i").column("loo_score").to_numpy(),
                               D.mean(axis=1), rtol=1e-5)


def test_cleaning_in_two_passes_equals_in_memory_cleaning(data, tmp_path):
    root, X, _ = data
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(k=2, clean_fraction=0.1, shards=2))
    ref = DN2Scorer(k=2, clean_fraction=0.1).fit(X)
    assert m["clean_k"] == CLEAN_K  # the default cleaning score's neighbours, recorded
    t = normal_table(tmp_path / "i")
    np.testing.assert_array_equal(t.column("kept").to_numpy(), ref.kept_mask_)
    assert (~ref.kept_mask_).sum() == 30
    loo = t.column("loo_score").to_numpy()
    np.testing.assert_allclose(loo[ref.kept_mask_], ref.train_scores_, rtol=1e-5)
    # The removed rows are in the reference too, scored against the kept rows.
    kept_x = X[ref.kept_mask_]
    np.testing.assert_allclose(loo[~ref.kept_mask_],
                               brute_scores(X[~ref.kept_mask_], kept_x, 2), rtol=1e-5)
    ids = t.column("id").to_numpy()
    np.testing.assert_array_equal(ids[ref.kept_mask_], np.arange(270))
    loaded = LoadedIndex(str(tmp_path / "i"), device="cpu")
    np.testing.assert_array_equal(np.concatenate(list(loaded.iter_shards())), X[ref.kept_mask_])
    assert not any(tmp_path.joinpath("i").glob("_clean*"))


def test_shard_at_a_time_scoring_equals_in_memory(data, tmp_path):
    root, X, _ = data
    build_index(str(root / "feats"), str(tmp_path / "i"), IndexConfig(k=2, shards=5))
    xq = clustered(50, seed=9)
    held = LoadedIndex(str(tmp_path / "i"), device="cpu")
    streamed = LoadedIndex(str(tmp_path / "i"), device="cpu", stream_shards=True)
    assert streamed.searcher.held == [] and len(held.searcher.held) == 5
    for a, b in zip(held.search(xq), streamed.search(xq), strict=True):
        np.testing.assert_array_equal(a, b)
    assert held.uris == streamed.uris
    np.testing.assert_array_equal(held.train_scores, streamed.train_scores)


def test_streamed_shard_changed_after_opening_is_refused(data, tmp_path):
    root, _, _ = data
    build_index(str(root / "feats"), str(tmp_path / "i"), IndexConfig(k=2, shards=2))
    streamed = LoadedIndex(str(tmp_path / "i"), device="cpu", stream_shards=True)
    other = tmp_path / "i" / "shard-00001-of-00002.faiss"
    idx = faiss.IndexFlatL2(8)
    idx.add(np.zeros((150, 8), np.float32))
    other.write_bytes(faiss.serialize_index(idx).tobytes())
    with pytest.raises(IndexError_, match="shard-00001-of-00002.faiss has sha256"):
        streamed.search(np.zeros((1, 8), np.float32))
    with pytest.raises(IndexError_, match="changed or damaged"):
        LoadedIndex(str(tmp_path / "i"), device="cpu", stream_shards=True)


def test_reference_sample_scores_only_the_sample_exactly(data, tmp_path):
    root, X, _ = data
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(k=2, shards=2, reference_sample=40))
    loo = normal_table(tmp_path / "i").column("loo_score").to_numpy()
    have = np.isfinite(loo)
    # 95 % DKW bound, by hand: 100 * sqrt(ln(2 / 0.05) / (2 * 40)) = 21.473 points
    assert have.sum() == 40 and m["reference"] == {
        "scores": 40, "sample": 40, "of": 300, "includes_removed": True,
        "percentile_error": 21.473, "how": "leave-one-out, exact",
        "tail": tail_entry(fit_tail(loo))}
    assert m["reference"]["tail"]["n_exceed"] == 20  # 40 // 2: just enough for a tail
    D, _ = knn_leave_one_out(X, 2)
    np.testing.assert_allclose(loo[have], D.mean(axis=1)[have], rtol=1e-5)
    loaded = LoadedIndex(str(tmp_path / "i"), device="cpu")
    np.testing.assert_allclose(loaded.train_scores, np.sort(D.mean(axis=1)[have]), rtol=1e-5)


def test_default_reference_is_a_bounded_sample_all_below_it(data, tmp_path):
    root, X, _ = data
    assert REFERENCE_SAMPLE == 20_000
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(k=2))  # 300 rows < 20k: all
    loo = normal_table(tmp_path / "i").column("loo_score").to_numpy()
    assert m["reference"] == {"scores": 300, "sample": None, "of": 300,
                              "includes_removed": True, "percentile_error": 0.0,
                              "how": "leave-one-out, exact", "tail": tail_entry(fit_tail(loo))}
    # 20k sampled: every percentile within 0.96 points at 95 % (by hand, as above)
    assert round(streams.percentile_error(20_000), 2) == 0.96


def test_kmeans_manifest_and_scores_equal_the_scorer(data, tmp_path):
    root, X, _ = data
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(k=2, n_centroids=4, shards=2))
    # 300 rows < 1024 * 4: trained on every row, in order, as DN2Scorer.
    assert m["n_centroids"] == 4
    assert m["kmeans"] == {"trained_on": 300, "sample_of": 300, "seed": 1234}
    assert "kmeans.faiss" in m["files"]
    # No row is left out of the training sample: the reference is cross-fitted.
    assert m["reference"]["how"] == ("distance to the nearest centre, out of sample: "
                                     "cross-fitted over 5 folds of the centres' training "
                                     "sample")
    ref = DN2Scorer(k=2, n_centroids=4).fit(X)
    loaded = LoadedIndex(str(tmp_path / "i"), device="cpu")
    np.testing.assert_allclose(loaded.centroids, ref.centroids_, rtol=1e-5, atol=1e-4)
    for shard in tmp_path.joinpath("i").glob("shard-*"):  # K-means scoring never reads them
        shard.unlink()
    xq = clustered(30, seed=3)
    s, D, I = loaded.search(xq)
    np.testing.assert_allclose(s, ref.score_samples(xq), rtol=1e-5)
    assert D.shape == (30, 0) and I.shape == (30, 0)
    # Out of sample: above DN2Scorer's in-sample distances (a row is near its own centre).
    assert np.median(loaded.train_scores) > np.median(ref.train_scores_)


def test_a_cleaned_index_samples_its_reference_among_every_normal_row(data, tmp_path):
    root, X, _ = data
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(k=2, clean_fraction=0.1, reference_sample=100))
    t = normal_table(tmp_path / "i")
    kept, loo = t.column("kept").to_numpy(), t.column("loo_score").to_numpy()
    # The draw an uncleaned index makes, among all 300 rows, kept or removed.
    rows = streams.sample_ids(300, 100, IndexConfig().seed + 2)
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(loo)), rows)
    removed = rows[~kept[rows]]
    assert len(removed) > 0
    # Kept rows: leave-one-out among the kept; removed rows: their k nearest kept rows.
    by_id = brute_loo_scores(X[kept], 2)
    sampled_kept = rows[kept[rows]]
    np.testing.assert_allclose(loo[sampled_kept],
                               by_id[t.column("id").to_numpy()[sampled_kept]], rtol=1e-5)
    np.testing.assert_allclose(loo[removed], brute_scores(X[removed], X[kept], 2), rtol=1e-5)
    assert {key: m["reference"][key] for key in ("scores", "sample", "of",
                                                 "includes_removed")} == {
        "scores": 100, "sample": 100, "of": 300, "includes_removed": True}
    ref = LoadedIndex(str(tmp_path / "i"), device="cpu").reference
    np.testing.assert_allclose(ref.scores, np.sort(loo[rows]))
    assert ref.tail == fit_tail(loo[rows]) and m["reference"]["tail"] == tail_entry(ref.tail)


@pytest.mark.parametrize("clean_sample, reference_sample, passes",
                         [(None, 200, 2), (150, 200, 3), (None, None, 4)])
def test_auto_cleaning_hands_its_removed_reference_rows_to_the_build(
        tmp_path, monkeypatch, clean_sample, reference_sample, passes):
    """The removed rows of the reference sample are scored from the rows the auto rule
    copied while it read the features (its sample, then its scoring pass), not from one
    pass more (but under --reference-sample all, where they could be any number: read
    again); their scores are a new image's against the kept rows, as brute force."""
    X = np.concatenate([clustered(300, seed=4), clustered(12, seed=5, offset=60.0)])
    write_features(tmp_path / "feats", X, [130, 0, 182])
    from dn2ops.index import build as build_module
    calls = []
    read = build_module.read_chunks
    monkeypatch.setattr(build_module, "read_chunks",
                        lambda *a, **kw: (calls.append(1), read(*a, **kw))[1])
    build_index(str(tmp_path / "feats"), str(tmp_path / "i"),
                IndexConfig(k=2, clean_fraction="auto", clean_sample=clean_sample,
                            reference_sample=reference_sample))
    # the sample, (the scoring pass,) the shards (and, for "all", every kept row, then the
    # removed ones)
    assert len(calls) == passes
    t = normal_table(tmp_path / "i")
    kept, loo = t.column("kept").to_numpy(), t.column("loo_score").to_numpy()
    rows = streams.sample_ids(312, reference_sample, IndexConfig().seed + 2)
    removed = rows[~kept[rows]]
    assert len(removed) >= 5 and not kept[300:].any()  # the far rows, at least
    np.testing.assert_allclose(loo[removed], brute_scores(X[removed], X[kept], 2), rtol=1e-5)
    np.testing.assert_array_equal(np.flatnonzero(np.isfinite(loo)), rows)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("ivf")
    X = clustered(4300, d=16, centers=40, seed=1)  # the last 300: held-out queries
    write_features(root / "feats", X[:4000], [1500, 1500, 1000])
    return root, X[:4000], X[4000:]


@pytest.mark.parametrize("ondisk", [False, True])
def test_ivf_records_recall_and_scores_are_upper_bounds(big, tmp_path, ondisk):
    root, X, held_out = big
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(k=2, ivf_lists=32, target_recall=0.95, ondisk=ondisk))
    info = m["ivf"]
    assert info["nlist"] == 32 and info["ondisk"] is ondisk and m["shards"] == 0
    assert info["recall"]["recall_at_k"] >= 0.95
    assert info["recall"]["at_nprobe"][str(info["nprobe"])] == info["recall"]["recall_at_k"]
    assert set(m["files"]) == ({"ivf.faiss", "ivf.ivfdata", "normal.parquet"} if ondisk
                               else {"ivf.faiss", "normal.parquet"})
    assert not any(tmp_path.joinpath("i").glob("_part-*"))
    loaded = LoadedIndex(str(tmp_path / "i"), device="cpu")
    assert ivf.ivf_of(loaded.searcher.index).nprobe == info["nprobe"]
    xq = held_out
    s, D, I = loaded.search(xq)
    exact = brute_scores(xq, X, 2)
    assert (s >= exact - 1e-4).all()  # a missed neighbour is replaced by a farther one
    # Recall on held-out queries of the same mixture agrees with the recorded one.
    R = np.linalg.norm(xq[:, None, :].astype(np.float64) - X[None], axis=2)
    true = np.argsort(R, axis=1)[:, :2]
    assert ivf.recall_at_k(I, true) >= info["recall"]["recall_at_k"] - 0.05
    np.testing.assert_allclose(D, np.take_along_axis(R, I, axis=1), rtol=1e-4)
    loo = normal_table(tmp_path / "i").column("loo_score").to_numpy()
    D_ex, _ = knn_leave_one_out(X, 2)
    assert (loo >= D_ex.mean(axis=1) - 1e-4).all()
    assert np.mean(np.isclose(loo, D_ex.mean(axis=1), rtol=1e-4)) >= 0.9


def test_ivf_with_small_nprobe_is_recorded_and_lower(big, tmp_path):
    root, X, held_out = big
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(k=2, ivf_lists=64, nprobe=1))
    assert m["ivf"]["nprobe"] == 1 and list(m["ivf"]["recall"]["at_nprobe"]) == ["1"]
    assert 0 < m["ivf"]["recall"]["recall_at_k"] < 0.95
    assert m["ivf"]["recall"]["target_reached"] is False


def test_ivf_pq_builds_and_searches(big, tmp_path):
    root, X, held_out = big
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(k=2, ivf_lists=16, pq_m=4, nprobe=16))
    assert m["ivf"]["pq"] == 4
    loaded = LoadedIndex(str(tmp_path / "i"), device="cpu")
    s, D, I = loaded.search(X[:20])
    assert I.shape == (20, 2) and (I >= 0).all()
    assert 0 < m["ivf"]["recall"]["recall_at_k"] <= 1


def test_hnsw_records_recall_and_scores_are_upper_bounds(big, tmp_path):
    root, X, held_out = big
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(k=2, hnsw_m=8, target_recall=0.95))
    info = m["hnsw"]
    assert info["m"] == 8 and m["shards"] == 0 and m["ivf"] is None
    assert set(m["files"]) == {"hnsw.faiss", "normal.parquet"}
    curve = info["recall"]["at_ef_search"]
    assert info["recall"]["target"] == 0.95 <= info["recall"]["recall_at_k"]
    assert curve[str(info["ef_search"])] == info["recall"]["recall_at_k"]
    assert info["recall"]["target_reached"] is True
    # efSearch is the first of 16, 32, ... that reaches the target: the ones before miss it.
    assert list(curve) == [str(e) for e in hnsw.EF_SEARCH[:len(curve)]]
    assert all(r < 0.95 for r in list(curve.values())[:-1])
    loaded = LoadedIndex(str(tmp_path / "i"), device="cpu")
    assert faiss.downcast_index(loaded.searcher.index).hnsw.efSearch == info["ef_search"]
    s, D, I = loaded.search(held_out)
    R = np.linalg.norm(held_out[:, None, :].astype(np.float64) - X[None], axis=2)
    assert (s >= brute_scores(held_out, X, 2) - 1e-4).all()
    np.testing.assert_allclose(D, np.take_along_axis(R, I, axis=1), rtol=1e-4)
    assert ivf.recall_at_k(I, np.argsort(R, axis=1)[:, :2]) >= info["recall"]["recall_at_k"] - 0.05
    loo = normal_table(tmp_path / "i").column("loo_score").to_numpy()
    D_ex, _ = knn_leave_one_out(X, 2)
    assert (loo >= D_ex.mean(axis=1) - 1e-4).all()
    assert np.mean(np.isclose(loo, D_ex.mean(axis=1), rtol=1e-4)) >= 0.9
    assert m["reference"]["how"] == "leave-one-out, HNSW (approximate)"


def test_hnsw_with_a_given_ef_search_measures_only_that(big, tmp_path):
    root, X, _ = big
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(k=2, hnsw_m=4, ef_search=2))
    assert m["hnsw"]["ef_search"] == 2 and list(m["hnsw"]["recall"]["at_ef_search"]) == ["2"]
    r2 = m["hnsw"]["recall"]["recall_at_k"]
    m = build_index(str(root / "feats"), str(tmp_path / "j"),
                    IndexConfig(k=2, hnsw_m=4, ef_search=256))
    assert 0 < r2 < m["hnsw"]["recall"]["recall_at_k"]


def test_manifest_is_json_with_checksums_of_every_file(data, tmp_path):
    root, _, _ = data
    m = build_index(str(root / "feats"), str(tmp_path / "i"), IndexConfig(k=2, shards=2))
    marker = json.loads((tmp_path / "i" / "_SUCCESS").read_text())
    assert marker["files"] == m["files"]
    on_disk = {p.name for p in (tmp_path / "i").iterdir()} - {"_SUCCESS"}
    assert on_disk == set(m["files"])


def test_rechunk_and_gather_rows():
    X = np.arange(40, dtype=np.float32).reshape(20, 2)
    chunks = [X[:7], X[7:8], X[8:20]]
    out = list(streams.rechunk(iter(chunks), [5, 5, 10]))
    assert [len(o) for o in out] == [5, 5, 10]
    np.testing.assert_array_equal(np.concatenate(out), X)
    np.testing.assert_array_equal(streams.gather_rows(iter(chunks), np.array([0, 7, 8, 19])),
                                  X[[0, 7, 8, 19]])
    with pytest.raises(ValueError, match="fewer rows"):
        list(streams.rechunk(iter(chunks), [5, 20]))


def test_flat_shards_are_held_once_in_their_own_index(data, tmp_path):
    """A held flat shard is the faiss index read from its file, shifted in place: its
    vectors are the stored ones minus their mean, and nothing else holds a copy."""
    root, X, _ = data
    build_index(str(root / "feats"), str(tmp_path / "i"), IndexConfig(k=2, shards=2))
    loaded = LoadedIndex(str(tmp_path / "i"), device="cpu")
    from dn2ops.index.knn import flat_vectors

    stored = list(loaded.iter_shards())
    for shard, xb in zip(loaded.searcher.held, stored, strict=True):
        np.testing.assert_allclose(shard.shift, xb.mean(axis=0), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(flat_vectors(shard.index), xb - shard.shift, atol=1e-5)
    assert sum(s.index.ntotal for s in loaded.searcher.held) == len(X)
