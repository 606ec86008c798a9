"""dn2ops.index.add (dn2 build-index --add): an index grown by the added rows, against a
fresh build of the union and brute-force numpy."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dn2ops.config import IndexConfig
from dn2ops.index import IndexError_, LoadedIndex, build_index
from dn2ops.index.add import add_to_index
from dn2ops.index.calibration import fit_tail, tail_entry
from dn2ops.index.knn import knn_leave_one_out
from dn2ops.io import features
from pipelines.cli import main
from tests.conftest import (
    META,
    brute_dists,
    brute_scores,
    clustered,
    root4_l2,
    write_features,
)

N_OLD, N_ADD = 300, 120


def _files(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """old/ (300 rows, 2 shards), added/ (120 rows, images 300..419), union/ (both)."""
    root = tmp_path_factory.mktemp("add")
    X = clustered(N_OLD + N_ADD + 50, seed=3)
    X[N_OLD:N_OLD + N_ADD] += 1.5  # the added images drift a little
    write_features(root / "old", X[:N_OLD], [200, 100])
    write_features(root / "added", X[N_OLD:N_OLD + N_ADD], [N_ADD], start=N_OLD)
    write_features(root / "union", X[:N_OLD + N_ADD], [200, 100, N_ADD])
    return root, X[:N_OLD + N_ADD], X[N_OLD + N_ADD:]


def test_flat_add_scores_and_reference_equal_a_fresh_build_of_the_union(sets, tmp_path):
    root, X, xq = sets
    parent = build_index(str(root / "old"), str(tmp_path / "p"),
                         IndexConfig(k=2, shards=2, reference_sample=None))
    before = _files(tmp_path / "p")
    m = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"),
                     reference_sample=None)
    assert _files(tmp_path / "p") == before  # the parent is left as it was
    fresh = build_index(str(root / "union"), str(tmp_path / "f"),
                        IndexConfig(k=2, shards=None, reference_sample=None))
    assert m["parent_index_id"] == parent["index_id"] != m["index_id"]
    assert m["added"] == {"features_dir": str(root / "added"), "images": N_ADD,
                          "parent": str(tmp_path / "p")}
    assert m["counts"] == fresh["counts"] == {"normal_in": N_OLD + N_ADD,
                                              "kept": N_OLD + N_ADD, "dropped": 0}
    assert m["shards"] == 3
    # The parent's shards are in the new index byte for byte, under the new count.
    parent_shards = {v for n, v in parent["files"].items() if n.startswith("shard-")}
    assert parent_shards < set(m["files"].values())
    s_add, _, _ = LoadedIndex(str(tmp_path / "a"), device="cpu").search(xq)
    s_new, _, _ = LoadedIndex(str(tmp_path / "f"), device="cpu").search(xq)
    np.testing.assert_allclose(s_add, s_new, rtol=1e-6)
    np.testing.assert_allclose(s_add, brute_scores(xq, X, 2), rtol=1e-5)
    loo_add = pq.read_table(tmp_path / "a" / "normal.parquet")
    loo_new = pq.read_table(tmp_path / "f" / "normal.parquet")
    assert loo_add.column("uri").to_pylist() == loo_new.column("uri").to_pylist()
    assert loo_add.column("id").to_pylist() == list(range(N_OLD + N_ADD))
    D, _ = knn_leave_one_out(X, 2)  # the reference over the union, by hand
    np.testing.assert_allclose(loo_add.column("loo_score").to_numpy(), D.mean(axis=1),
                               rtol=1e-5)
    np.testing.assert_allclose(loo_add.column("loo_score").to_numpy(),
                               loo_new.column("loo_score").to_numpy(), rtol=1e-6)


def test_kmeans_keeps_its_centres_and_reports_drift_unless_retrained(sets, tmp_path):
    root, X, xq = sets
    build_index(str(root / "old"), str(tmp_path / "p"), IndexConfig(k=2, n_centroids=4))
    m = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"))
    assert m["files"]["kmeans.faiss"] == _files(tmp_path / "p")["kmeans.faiss"]
    centres = LoadedIndex(str(tmp_path / "p"), device="cpu").centroids
    nearest = np.sqrt(((X[N_OLD:, None, :].astype(np.float64) - centres[None]) ** 2)
                      .sum(-1)).min(axis=1)
    parent_ref = pq.read_table(tmp_path / "p" / "normal.parquet").column("loo_score")
    drift = m["kmeans"]["drift"]
    assert m["kmeans"]["retrained"] is False
    assert drift["added_mean_distance"] == pytest.approx(nearest.mean(), rel=1e-5)
    assert drift["parent_mean_distance"] == pytest.approx(
        np.nanmean(parent_ref.to_numpy()), rel=1e-5)
    assert drift["ratio"] > 1  # the added rows were shifted away from the centres
    s, _, _ = LoadedIndex(str(tmp_path / "a"), device="cpu").search(xq)
    np.testing.assert_allclose(s, np.sqrt(((xq[:, None, :].astype(np.float64) - centres[None])
                                           ** 2).sum(-1)).min(axis=1), rtol=1e-5)
    r = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "r"),
                     retrain=True)
    assert r["kmeans"]["retrained"] is True and r["kmeans"]["trained_on"] == N_OLD + N_ADD
    assert r["files"]["kmeans.faiss"] != m["files"]["kmeans.faiss"]


@pytest.mark.parametrize("mode", ["ivf", "hnsw"])
def test_approximate_indexes_take_the_added_rows_and_measure_recall_again(sets, tmp_path,
                                                                          mode):
    root, X, xq = sets
    kw = {"ivf_lists": 8} if mode == "ivf" else {"hnsw_m": 8}
    parent = build_index(str(root / "old"), str(tmp_path / "p"), IndexConfig(k=2, **kw))
    m = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"))
    effort = "nprobe" if mode == "ivf" else "ef_search"
    assert m[mode][effort] == parent[mode][effort]  # searched as the parent was
    rec = m[mode]["recall"]
    assert rec["parent_recall_at_k"] == parent[mode]["recall"]["recall_at_k"]
    assert 0 < rec["recall_at_k"] <= 1 and rec["queries"] == parent[mode]["recall"]["queries"]
    loaded = LoadedIndex(str(tmp_path / "a"), device="cpu")
    index = loaded.searcher.index
    assert index.ntotal == N_OLD + N_ADD
    s, D, I = loaded.search(X[N_OLD:])  # the added rows find themselves
    assert (I[:, 0] == np.arange(N_OLD, N_OLD + N_ADD)).mean() >= 0.95
    s, _, _ = loaded.search(xq)
    exact = brute_scores(xq, X, 2)
    assert (s >= exact - 1e-4).all()  # approximate: never below exact
    assert np.mean(np.isclose(s, exact, rtol=1e-4)) >= rec["recall_at_k"] - 0.15


def test_images_already_in_the_index_are_refused(sets, tmp_path):
    root, X, _ = sets
    build_index(str(root / "old"), str(tmp_path / "p"), IndexConfig(k=2))
    write_features(tmp_path / "again", X[290:310], [20], start=290)  # 10 held already
    with pytest.raises(IndexError_, match="10 of the added images are already in"):
        add_to_index(str(tmp_path / "again"), str(tmp_path / "p"), str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()


def test_another_backbone_or_preprocessing_is_refused(sets, tmp_path):
    root, X, _ = sets
    build_index(str(root / "old"), str(tmp_path / "p"), IndexConfig(k=2))
    other = {**META, "preprocessing": {**META["preprocessing"], "resize": 9}}
    write_features(tmp_path / "other", X[N_OLD:], [N_ADD], start=N_OLD, meta=other)
    with pytest.raises(features.MetadataMismatch, match="preprocessing.resize: index 8, "
                                                        "features 9"):
        add_to_index(str(tmp_path / "other"), str(tmp_path / "p"), str(tmp_path / "a"))


def test_an_ivf_index_whose_features_are_gone_is_refused(sets, tmp_path):
    root, X, _ = sets
    write_features(tmp_path / "gone", X[:N_OLD], [N_OLD])
    build_index(str(tmp_path / "gone"), str(tmp_path / "p"), IndexConfig(k=2, ivf_lists=8))
    (tmp_path / "gone" / "_SUCCESS").unlink()
    with pytest.raises(IndexError_, match="features .* are not readable"):
        add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"))


def test_cli_add_then_score(sets, tmp_path, capsys):
    root, X, xq = sets
    assert main(["build-index", "--features", str(root / "old"), "--output",
                 str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert main(["build-index", "--add", str(root / "added"), "--index", str(tmp_path / "p"),
                 "--output", str(tmp_path / "a"), "--device", "cpu"]) == 0
    m = json.loads((tmp_path / "a" / "_SUCCESS").read_text())
    # The default cleans: the parent by the auto rule, the added images by its threshold.
    kept = pq.read_table(tmp_path / "a" / "normal.parquet").column("kept").to_numpy()
    assert m["cleaning"]["rule"] == "auto" and m["cleaning"]["added"]["rule"] == "auto"
    assert m["cleaning"]["added"]["removed"] == N_ADD - kept[N_OLD:].sum() <= N_ADD // 2
    # These 8-d rows are clean, but in so few dimensions their log scores spread wider than
    # the rule's 0.25 cap above the median, which then sets the threshold and removes about
    # a fifth of them (high-dimensional clean sets lose far fewer: test_cleaning.py).
    c = m["cleaning"]
    assert c["threshold"] == pytest.approx(c["median"] + 0.25) and 3 * c["scale"] > 0.25
    assert m["counts"]["dropped"] == (~kept).sum() <= len(kept) // 2
    assert m["added"]["images"] == kept[N_OLD:].sum() and m["feature_transform"] == "root4-l2"
    # The added rows were transformed as the parent's were: scores over root4-l2 features.
    s, _, _ = LoadedIndex(str(tmp_path / "a"), device="cpu").search(xq)
    np.testing.assert_allclose(s, brute_scores(root4_l2(xq), root4_l2(X[kept]), 2), rtol=1e-4)
    with pytest.raises(SystemExit):
        main(["build-index", "--add", str(root / "added"), "--index", str(tmp_path / "p"),
              "--output", str(tmp_path / "b"), "--kmeans", "4"])
    assert "--add keeps the parent index's --kmeans" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build-index", "--add", str(root / "added"), "--output", str(tmp_path / "b")])
    assert "--add needs --index INDEX_DIR" in capsys.readouterr().err


def _loo_by_hand(X: np.ndarray, k: int = 2) -> np.ndarray:
    D, _ = knn_leave_one_out(X, k)
    return D.mean(axis=1)


def test_a_sampled_reference_grows_incrementally_and_stays_exact(sets, tmp_path):
    root, X, _ = sets
    build_index(str(root / "old"), str(tmp_path / "p"), IndexConfig(k=2, reference_sample=100))
    m = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"),
                     reference_sample=100)
    assert m["reference"]["incremental"] is True
    loo = pq.read_table(tmp_path / "a" / "normal.parquet")
    score = loo.column("loo_score").to_numpy()
    sampled = np.flatnonzero(np.isfinite(score))
    # A uniform sample of the union: ~100 rows, old and added in proportion.
    assert abs(len(sampled) - 100) <= 1 and m["reference"]["sample"] == len(sampled)
    assert 20 <= (sampled >= N_OLD).sum() <= 38  # 100 * 120 / 420 = 28.6
    # Each sampled parent row's distances were merged with those to the added rows:
    # its score is the leave-one-out score over the union, as a fresh build computes it.
    np.testing.assert_allclose(score[sampled], _loo_by_hand(X)[sampled], rtol=1e-5)
    D = np.stack(loo.column("loo_distances").filter(np.isfinite(score)).to_pylist())
    np.testing.assert_allclose(D.mean(axis=1), score[sampled], rtol=1e-6)


def test_a_parent_without_reference_distances_is_scored_afresh(sets, tmp_path):
    root, X, _ = sets
    build_index(str(root / "old"), str(tmp_path / "p"), IndexConfig(k=2, reference_sample=None))
    normal = tmp_path / "p" / "normal.parquet"  # as dn2 wrote it before loo_distances
    pq.write_table(pq.read_table(normal).drop_columns(["loo_distances"]), normal)
    marker = json.loads((tmp_path / "p" / "_SUCCESS").read_text())
    marker["files"]["normal.parquet"] = hashlib.sha256(normal.read_bytes()).hexdigest()
    (tmp_path / "p" / "_SUCCESS").write_text(json.dumps(marker))
    m = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"),
                     reference_sample=None)
    assert m["reference"]["incremental"] is False
    score = pq.read_table(tmp_path / "a" / "normal.parquet").column("loo_score").to_numpy()
    np.testing.assert_allclose(score, _loo_by_hand(X), rtol=1e-5)


def test_a_parent_sampled_more_thinly_than_asked_gets_a_fresh_sample(sets, tmp_path):
    root, X, _ = sets
    build_index(str(root / "old"), str(tmp_path / "p"), IndexConfig(k=2, reference_sample=50))
    m = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"),
                     reference_sample=200)  # 200 / 420 > the parent's 50 / 300
    assert m["reference"]["incremental"] is False and m["reference"]["sample"] == 200
    score = pq.read_table(tmp_path / "a" / "normal.parquet").column("loo_score").to_numpy()
    sampled = np.flatnonzero(np.isfinite(score))
    np.testing.assert_allclose(score[sampled], _loo_by_hand(X)[sampled], rtol=1e-5)


def _cleaned_parent(features_dir, parent_dir, reference_sample):
    """A parent cleaned by a fraction (its added rows are then kept as they are)."""
    build_index(str(features_dir), str(parent_dir),
                IndexConfig(k=2, clean_fraction=0.1, reference_sample=reference_sample))
    return pq.read_table(parent_dir / "normal.parquet").column("kept").to_numpy()


@pytest.mark.parametrize("parent_sample, incremental", [(None, True), (100, False)])
def test_a_cleaned_parent_keeps_its_removed_rows_in_the_reference(sets, tmp_path,
                                                                  parent_sample, incremental):
    root, X, _ = sets
    kept_old = _cleaned_parent(root / "old", tmp_path / "p", parent_sample)
    m = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"),
                     reference_sample=None)
    t = pq.read_table(tmp_path / "a" / "normal.parquet")
    kept, ids = t.column("kept").to_numpy(), t.column("id").to_numpy()
    loo = t.column("loo_score").to_numpy()
    np.testing.assert_array_equal(kept, np.concatenate([kept_old, np.ones(N_ADD, bool)]))
    assert np.isfinite(loo).all()  # every row, the 30 the parent removed included
    # Removed rows: their k nearest kept rows of the union; kept: leave-one-out over them.
    np.testing.assert_allclose(loo[~kept], brute_scores(X[~kept], X[kept], 2), rtol=1e-5)
    np.testing.assert_allclose(loo[kept], _loo_by_hand(X[kept])[ids[kept]], rtol=1e-5)
    ref = m["reference"]
    assert (ref["incremental"], ref["includes_removed"], ref["of"], ref["scores"]) == (
        incremental, True, N_OLD + N_ADD, N_OLD + N_ADD)
    assert ref["tail"] == tail_entry(fit_tail(loo))
    assert LoadedIndex(str(tmp_path / "a"), device="cpu").reference.n == N_OLD + N_ADD


def test_removed_rows_whose_features_are_gone_leave_the_reference(sets, tmp_path, caplog):
    root, X, _ = sets
    write_features(tmp_path / "gone", X[:N_OLD], [N_OLD])
    kept_old = _cleaned_parent(tmp_path / "gone", tmp_path / "p", None)
    (tmp_path / "gone" / "_SUCCESS").unlink()
    m = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"),
                     reference_sample=None)
    loo = pq.read_table(tmp_path / "a" / "normal.parquet").column("loo_score").to_numpy()
    assert np.isnan(loo[:N_OLD][~kept_old]).all() and np.isfinite(loo[:N_OLD][kept_old]).all()
    assert m["reference"]["includes_removed"] is False
    assert "left out of it: the parent's features" in caplog.text
    ref = LoadedIndex(str(tmp_path / "a"), device="cpu").reference
    assert ref.n == kept_old.sum() + N_ADD


def test_kmeans_grows_an_out_of_sample_reference(sets, tmp_path):
    """A parent of 300 rows and 1 centre, trained on all of them (cross-fitted); 250 rows
    added: with the centre kept they are out of its sample and enough (>= 200) to be the
    reference alone; retrained on all 550, the reference is cross-fitted again."""
    root, X, _ = sets
    more = clustered(250, seed=21)
    write_features(tmp_path / "more", more, [250], start=1000)
    p = build_index(str(root / "old"), str(tmp_path / "p"), IndexConfig(k=2, n_centroids=1))
    assert "cross-fitted" in p["reference"]["how"]
    m = add_to_index(str(tmp_path / "more"), str(tmp_path / "p"), str(tmp_path / "a"))
    assert m["reference"]["how"].endswith("rows not in the centres' training sample")
    loo = pq.read_table(tmp_path / "a" / "normal.parquet").column("loo_score").to_numpy()
    assert np.isnan(loo[:N_OLD]).all() and np.isfinite(loo[N_OLD:]).all()
    centre = LoadedIndex(str(tmp_path / "p"), device="cpu").centroids
    np.testing.assert_allclose(loo[N_OLD:], brute_dists(more, centre)[:, 0], rtol=1e-5)
    assert m["kmeans"]["sample_of"] == N_OLD and m["reference"]["tail"] == tail_entry(
        fit_tail(loo))
    r = add_to_index(str(tmp_path / "more"), str(tmp_path / "p"), str(tmp_path / "r"),
                     retrain=True)
    assert "cross-fitted" in r["reference"]["how"] and r["kmeans"]["trained_on"] == 550
    loo = pq.read_table(tmp_path / "r" / "normal.parquet").column("loo_score").to_numpy()
    assert np.isfinite(loo).all()
