"""dn2ops.score.images: batch scoring through RunInference and the ranking pass over written
shards, against brute-force numpy (distances, and ranks counted over all pairs)."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from dn2ops.config import IndexConfig, SearchConfig
from dn2ops.index import build_index
from dn2ops.io import features
from dn2ops.score.images import (
    IndexModelHandler,
    ScoreFeatures,
    SortedScores,
    anomaly_schema,
    rank_shard,
    ranks,
    score_batch,
)
from tests.conftest import brute_scores, clustered, write_features


def _fail(what):
    raise BeamAssertException(f"unexpected: {what}")


def brute_ranks(scores: np.ndarray) -> np.ndarray:
    """1 + the number of strictly higher scores, by comparing every pair."""
    return 1 + (scores[None, :] > scores[:, None]).sum(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_share_the_better_rank_on_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 20, 500).astype(np.float64) / 4  # many ties
    got = ranks(scores, np.sort(scores))
    np.testing.assert_array_equal(got, brute_ranks(scores))
    assert got.dtype == np.int64


def test_ranks_by_hand():
    # 3.0 twice: nothing higher, both rank 1; 2.0: two higher, rank 3; 1.0: rank 4.
    scores = np.array([3.0, 1.0, 3.0, 2.0])
    assert ranks(scores, np.sort(scores)).tolist() == [1, 4, 1, 3]
    # A score not among them: 1 + the number of sorted scores strictly above it.
    assert ranks(np.array([2.5, 9.0, 0.0]), np.sort(scores)).tolist() == [3, 1, 5]


def _unranked(path, scores: np.ndarray) -> None:
    n = len(scores)
    rows = [{"uri": f"u{i:04d}", "score": float(s), "rank": None, "percentile": 50.0,
             "neighbor_uris": ["a", "b"], "neighbor_distances": [1.0, 2.0],
             "partition": "p", "backbone": "toy", "index_id": "x", "sha256": f"h{i}"}
            for i, s in enumerate(scores)]
    pq.write_table(pa.Table.from_pylist(rows, anomaly_schema()), path, row_group_size=n // 3)


def test_rank_shard_rewrites_every_row_with_its_global_rank(tmp_path):
    rng = np.random.default_rng(3)
    scores = np.round(rng.gamma(2, 1, 700), 1)  # ties
    _unranked(tmp_path / "a.parquet", scores[:400])
    _unranked(tmp_path / "b.parquet", scores[400:])
    everything = np.sort(scores)
    for name in ("a.parquet", "b.parquet"):
        rank_shard(str(tmp_path / name), str(tmp_path / f"ranked-{name}"), everything,
                   batch_size=64)  # several slices a shard
    got = pa.concat_tables([pq.read_table(tmp_path / f"ranked-{n}")
                            for n in ("a.parquet", "b.parquet")])
    np.testing.assert_array_equal(got.column("score").to_numpy(), scores)
    np.testing.assert_array_equal(got.column("rank").to_numpy(), brute_ranks(scores))
    assert got.schema == anomaly_schema()
    # every other column as it was
    before = pa.concat_tables([pq.read_table(tmp_path / n) for n in ("a.parquet", "b.parquet")])
    assert got.drop_columns(["rank"]).equals(before.drop_columns(["rank"]))


def test_sorted_scores_combines_arrays_into_one_sorted_array():
    rng = np.random.default_rng(4)
    parts = [rng.normal(size=m) for m in (5, 0, 17, 100, 1)] * 30  # > 64 arrays a bundle
    with BeamTestPipeline() as p:
        got = (p | beam.Create(parts, reshuffle=False)
               | beam.CombineGlobally(SortedScores()) | beam.Map(list))
        assert_that(got, equal_to([list(np.sort(np.concatenate(parts)))]))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """An exact k=2 index over 300 normal rows (8-d), and its vectors."""
    root = tmp_path_factory.mktemp("scoring")
    xb = clustered(300, seed=5)
    write_features(root / "normal", xb, [120, 180])
    build_index(str(root / "normal"), str(root / "index"), IndexConfig(k=2))
    return str(root / "index"), xb


def _queries(n: int) -> tuple[pa.RecordBatch, np.ndarray]:
    xq = clustered(n, seed=6, offset=21.0)
    xq[n // 2:n // 2 + 5] = xq[0]  # identical rows: tied scores
    emb = pa.FixedSizeListArray.from_arrays(pa.array(xq.ravel()), xq.shape[1])
    schema = features.feature_schema(["lot"])
    batch = pa.RecordBatch.from_pylist(
        [{"uri": f"q{i:03d}", "sha256": f"s{i}", "backbone": "toy", "dim": 8,
          "lot": f"L{i % 3}"} for i in range(n)], schema=schema.remove(4))
    batch = batch.add_column(4, schema.field("embedding"), emb.cast(pa.list_(pa.float32())))
    return batch, xq


def test_run_inference_with_the_index_handler_scores_each_batch(index):
    index_dir, xb = index
    batch, xq = _queries(40)
    expected = brute_scores(xq, xb, 2)

    def check(outputs):
        got = pa.Table.from_batches(outputs).sort_by("uri")
        if got.column("uri").to_pylist() != [f"q{i:03d}" for i in range(40)]:
            raise BeamAssertException(f"uris {got.column('uri')}")
        np.testing.assert_allclose(got.column("score").to_numpy(), expected, rtol=1e-5)
        assert got.column("rank").null_count == 40  # ranked later, over all batches
        assert got.column("lot").to_pylist() == [f"L{i % 3}" for i in range(40)]
        assert got.column("index_id").unique().to_pylist() != [None]
        assert [len(u) for u in got.column("neighbor_uris").to_pylist()] == [2] * 40

    with BeamTestPipeline() as p:
        out = (p | beam.Create([batch.slice(0, 25), batch.slice(25)], reshuffle=False)
               | RunInference(IndexModelHandler(index_dir, partition="p1",
                                                search=SearchConfig(device="cpu"))))
        assert_that(out, check)


def test_score_features_writes_ranked_shards_equal_to_brute_force(index, tmp_path):
    index_dir, xb = index
    batch, xq = _queries(60)
    staging = tmp_path / "_staging-test"
    with BeamTestPipeline() as p:
        written = (p | beam.Create([batch.slice(0, 7), batch.slice(7, 30), batch.slice(37)])
                   | ScoreFeatures(index_dir, str(staging), extra_columns=["lot"],
                                   partition="p1", search=SearchConfig(device="cpu")))
        assert_that(written | beam.Map(lambda f: f.rsplit("/", 1)[0]),
                    lambda dirs: dirs and set(dirs) == {str(staging)} or _fail(dirs),
                    label="RankedIntoStaging")
    got = features.read_table(str(staging), "anomalies").sort_by("uri")
    assert got.schema == anomaly_schema(["lot"])
    scores = got.column("score").to_numpy()
    np.testing.assert_allclose(scores, brute_scores(xq, xb, 2), rtol=1e-5)
    np.testing.assert_array_equal(got.column("rank").to_numpy(), brute_ranks(scores))
    assert len(set(got.column("rank").to_pylist()[30:35]) | {got["rank"][0].as_py()}) == 1
    assert got.column("partition").unique().to_pylist() == ["p1"]


def test_kmeans_index_scores_are_distances_to_the_nearest_centre(index, tmp_path):
    """K-means mode has no neighbours (k' = 0): empty lists, not an error."""
    _, xb = index
    write_features(tmp_path / "normal", xb, [300])
    build_index(str(tmp_path / "normal"), str(tmp_path / "index"), IndexConfig(k=2, n_centroids=4))
    from dn2ops.index import LoadedIndex

    loaded = LoadedIndex(str(tmp_path / "index"), device="cpu")
    batch, xq = _queries(30)
    got = score_batch(batch, loaded, "p")
    centres = loaded.centroids.astype(np.float64)
    expected = np.linalg.norm(xq[:, None].astype(np.float64) - centres[None], axis=2).min(1)
    np.testing.assert_allclose(got.column("score").to_numpy(), expected, rtol=1e-5)
    assert got.column("neighbor_uris").to_pylist() == [[]] * 30
    assert got.column("neighbor_distances").to_pylist() == [[]] * 30


def test_the_index_handler_keeps_its_own_metrics_namespace_and_counts_arrow_bytes():
    """Scoring's RunInference counters stay apart from embedding's (dn2_score, not dn2);
    a batch's size is its record batches' Arrow bytes."""
    handler = IndexModelHandler("unused-until-load_model")
    batch = pa.record_batch({"x": pa.array(np.arange(10, dtype=np.float64))})
    assert handler.get_metrics_namespace() == "dn2_score"
    assert handler.get_num_bytes([batch, batch]) == 2 * 80
