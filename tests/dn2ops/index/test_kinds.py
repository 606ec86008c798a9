"""dn2ops.index.kinds: the registry picks a kind from a config and from a manifest, and each
registered kind builds, loads and searches to the brute-force numpy answer."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from dn2ops.config import IndexConfig
from dn2ops.errors import ConfigError
from dn2ops.index import IndexError_, LoadedIndex, build_index_from_arrays, kinds, streams
from dn2ops.index.files import IndexDir
from dn2ops.index.kinds.kmeans import KMEANS_FOLDS
from dn2ops.io import outputs
from tests.conftest import META, brute_dists, brute_knn, clustered

N = 300
# Each kind with settings under which its search is exact on N rows: IVF probing every
# list, HNSW with an efSearch beyond N, K-means with a centre per row (the centres are
# then the rows, so the nearest centre is the nearest row).
CONFIGS = {
    "flat": IndexConfig(k=2, shards=3),
    "kmeans": IndexConfig(k=2, n_centroids=N),
    "ivf": IndexConfig(k=2, ivf_lists=4, nprobe=4),
    "hnsw": IndexConfig(k=2, hnsw_m=16, ef_search=1024),
}


@pytest.fixture(scope="module")
def data():
    X = clustered(N + 40, seed=11)
    return X[:N], X[N:]


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    """name -> (index directory, manifest) of an index of each kind over the same rows."""
    X, _ = data
    root = tmp_path_factory.mktemp("kinds")
    uris = [f"u{i:03d}" for i in range(N)]
    return {name: (str(root / name), build_index_from_arrays(uris, uris, X, META,
                                                             str(root / name), config))
            for name, config in CONFIGS.items()}


def test_the_registry_holds_each_kind_once_flat_last():
    names = [kind.name for kind in kinds.KINDS]
    assert sorted(names) == ["flat", "hnsw", "ivf", "kmeans"]
    assert names[-1] == "flat"  # the default: asked last
    assert list(kinds.manifest_entries({})) == ["ivf", "hnsw", "kmeans"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_kind_is_chosen_from_the_config(name):
    assert kinds.for_config(CONFIGS[name]).name == name


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_kind_is_chosen_from_the_manifest(built, name):
    _, manifest = built[name]
    assert kinds.for_manifest(manifest).name == name
    assert manifest["reference"]["how"].startswith(kinds.for_manifest(manifest).how)
    # Each keyed kind's entry: this kind's filled in, the others' None.
    for key in ("ivf", "hnsw", "kmeans"):
        assert (manifest[key] is not None) == (key == name)


def test_the_kind_is_chosen_from_a_bare_manifest():
    assert kinds.for_manifest({"n_centroids": None}).name == "flat"
    assert kinds.for_manifest({"n_centroids": 4}).name == "kmeans"
    assert kinds.for_manifest({"n_centroids": None, "ivf": {"nprobe": 1}}).name == "ivf"
    assert kinds.for_manifest({"n_centroids": None, "hnsw": {"ef_search": 16}}).name == "hnsw"
    assert kinds.for_manifest({"n_centroids": None, "ivf": None, "hnsw": None}).name == "flat"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_kind_loads_and_searches_to_the_brute_force_answer(built, data, name):
    X, xq = data
    directory, manifest = built[name]
    kind = kinds.for_manifest(manifest)
    searcher = kind.load(IndexDir(directory, manifest), device="cpu", stream_shards=False)
    scores, D, I = searcher.search(xq)
    k = kind.width(2)
    D_ref, I_ref = brute_knn(xq, X, k)
    np.testing.assert_allclose(scores, D_ref.mean(axis=1), rtol=1e-5)
    if kind.neighbours:
        np.testing.assert_array_equal(I, I_ref)
        np.testing.assert_allclose(D, D_ref, rtol=1e-5)
    else:  # K-means: the distance to the nearest centre, no neighbours
        assert D.shape == I.shape == (len(xq), 0)


@pytest.mark.parametrize("name", ["flat", "ivf", "hnsw"])
def test_each_kind_scores_its_reference_leave_one_out(built, data, name):
    X, _ = data
    directory, manifest = built[name]
    loo = pq.read_table(f"{directory}/normal.parquet").column("loo_score").to_numpy()
    R = brute_dists(X, X)
    np.fill_diagonal(R, np.inf)
    np.testing.assert_allclose(loo, np.sort(R, axis=1)[:, :2].mean(axis=1), rtol=1e-5)


def test_kmeans_cross_fits_its_reference_when_every_row_trained_the_centres(built, data):
    """N rows, N centres: every row trains them (no row is left out), so each reference
    score comes from the centres of the other folds, which are those folds' rows: the
    distance to the nearest row of another fold (in sample it would be 0)."""
    X, _ = data
    directory, manifest = built["kmeans"]
    assert "cross-fitted over 5 folds" in manifest["reference"]["how"]
    loo = pq.read_table(f"{directory}/normal.parquet").column("loo_score").to_numpy()
    fold = np.empty(N, np.int64)  # the folds, as documented: a seeded permutation
    fold[np.random.default_rng(IndexConfig().seed + 5).permutation(N)] = (
        np.arange(N) % KMEANS_FOLDS)
    R = brute_dists(X, X)
    R[fold[:, None] == fold[None, :]] = np.inf
    np.testing.assert_allclose(loo, R.min(axis=1), rtol=1e-5)
    assert (loo > 0).all()


@pytest.mark.parametrize("clean", [0.0, 0.1])
def test_kmeans_reference_is_the_rows_out_of_its_training_sample(tmp_path, clean):
    """1500 rows, 1 centre: trained on a sample of 1024, so the 476 others (and removed
    rows at their rate, 326 / 1350 with cleaning) are the reference, scored against the
    centre."""
    X = clustered(1500, seed=12)
    uris = [f"u{i:04d}" for i in range(1500)]
    m = build_index_from_arrays(uris, uris, X, META, str(tmp_path / "i"),
                                IndexConfig(k=2, n_centroids=1, clean_fraction=clean))
    assert m["reference"]["how"] == ("distance to the nearest centre, out of sample: rows "
                                     "not in the centres' training sample")
    t = pq.read_table(tmp_path / "i" / "normal.parquet")
    kept, ids = t.column("kept").to_numpy(), t.column("id").to_numpy()
    loo = t.column("loo_score").to_numpy()
    n_kept = int(kept.sum())
    trained = np.zeros(1500, bool)
    trained[np.flatnonzero(kept)[streams.sample_ids(n_kept, 1024, IndexConfig().seed)]] = True
    assert m["kmeans"]["trained_on"] == 1024 and ids[trained].max() < n_kept
    ref = np.isfinite(loo)
    assert not (ref & trained).any()
    np.testing.assert_array_equal(ref[kept], ~trained[kept])  # every held-out kept row
    assert (ref & ~kept).sum() == round((~kept).sum() * (n_kept - 1024) / n_kept)
    centre = LoadedIndex(str(tmp_path / "i"), device="cpu").centroids
    np.testing.assert_allclose(loo[ref], brute_dists(X[ref], centre)[:, 0], rtol=1e-5)


def test_flat_shards_stream_to_the_held_answer(built, data):
    directory, manifest = built["flat"]
    flat = kinds.for_manifest(manifest)
    held = flat.load(IndexDir(directory, manifest), device="cpu", stream_shards=False)
    streamed = flat.load(IndexDir(directory, manifest), device="cpu", stream_shards=True)
    assert len(held.held) == 3 and streamed.held == []
    for a, b in zip(held.search(data[1]), streamed.search(data[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_approximate_kinds_log_their_recall(built, caplog):
    with caplog.at_level(logging.INFO, logger="dn2"):
        for name in CONFIGS:
            _, manifest = built[name]
            kinds.for_manifest(manifest).log_built(manifest, 2)
    assert [r.getMessage() for r in caplog.records] == [
        "IVF: nprobe 4, recall@2 1.000 (approximate scores)",
        "HNSW: ef_search 1024, recall@2 1.000 (approximate scores)"]


def test_kind_specific_refusals():
    ivf = kinds.for_config(IndexConfig(ivf_lists=4, ondisk=True))
    memory_fs, _ = outputs.fs_and_path("memory://dn2-kinds")
    with pytest.raises(ConfigError, match="--ondisk needs a local --output"):
        ivf.check_output(IndexConfig(ivf_lists=4, ondisk=True), memory_fs)
    with pytest.raises(IndexError_, match="keeps its IVF lists on disk"):
        ivf.check_addable({"ivf": {"ondisk": True}}, "idx")
    flat = kinds.for_config(IndexConfig())
    flat.check_output(IndexConfig(), memory_fs)  # any filesystem
    assert flat.min_kept(IndexConfig(k=2)) == 3
    assert kinds.for_config(IndexConfig(n_centroids=7)).min_kept(IndexConfig(n_centroids=7)) == 7
