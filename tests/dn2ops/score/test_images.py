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

from dn2ops.config import FlagConfig, IndexConfig, SearchConfig
from dn2ops.index import LoadedIndex, build_index
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
from tests.dn2ops.score.test_decisions import brute_bh, brute_p


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
             "p_value": 0.5, "p_value_source": "rank", "flagged": None,
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
    return _batch(xq), xq


def _batch(xq: np.ndarray) -> pa.RecordBatch:
    n = len(xq)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(xq.ravel()), xq.shape[1])
    schema = features.feature_schema(["lot"])
    batch = pa.RecordBatch.from_pylist(
        [{"uri": f"q{i:03d}", "sha256": f"s{i}", "backbone": "toy", "dim": 8,
          "lot": f"L{i % 3}"} for i in range(n)], schema=schema.remove(4))
    return batch.add_column(4, schema.field("embedding"), emb.cast(pa.list_(pa.float32())))


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
        written, _ = (p | beam.Create([batch.slice(0, 7), batch.slice(7, 30), batch.slice(37)])
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


def test_rank_shard_flags_the_rows_at_or_above_the_decisions_threshold(tmp_path):
    scores = np.round(np.random.default_rng(9).gamma(2, 1, 200), 1)
    _unranked(tmp_path / "a.parquet", scores)
    cases = {"t": ({"flags": {"rule": "fdr", "threshold": 3.0}}, scores >= 3.0),
             "none": ({"flags": {"rule": "alpha", "threshold": None}}, np.zeros(200, bool)),
             "no-rule": ({"flags": {"rule": None, "why": "covtrace"}}, None)}
    for name, (decision, expected) in cases.items():
        rank_shard(str(tmp_path / "a.parquet"), str(tmp_path / f"{name}.parquet"),
                   np.sort(scores), decision, batch_size=64)
        got = pq.read_table(tmp_path / f"{name}.parquet").column("flagged")
        if expected is None:
            assert got.null_count == 200
        else:
            np.testing.assert_array_equal(got.to_numpy(zero_copy_only=False), expected)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    """An exact k=2 index of 30 normal rows: too few for a tail (rank p-values only); and
    40 queries: 30 more normal rows and 10 of them moved far away (anomalies)."""
    root = tmp_path_factory.mktemp("small")
    x = clustered(60, seed=5)
    write_features(root / "normal", x[:30], [30])
    build_index(str(root / "normal"), str(root / "index"), IndexConfig(k=2))
    xq = np.concatenate([x[30:], x[30:40] + 6.0])
    return str(root / "index"), xq


def _reference_scores(index_dir: str) -> np.ndarray:
    normal = pq.read_table(f"{index_dir}/normal.parquet")
    return normal.column("loo_score").to_numpy(zero_copy_only=False)


def test_p_values_equal_the_rank_p_values_counted_by_hand(small_index):
    index_dir, xq = small_index
    loaded = LoadedIndex(index_dir, device="cpu")
    assert loaded.reference.tail is None and loaded.reference.n == 30
    got = score_batch(_batch(xq), loaded, "p")
    scores = got.column("score").to_numpy()
    np.testing.assert_allclose(got.column("p_value").to_numpy(),
                               brute_p(scores, _reference_scores(index_dir)), rtol=1e-12)
    assert got.column("p_value_source").unique().to_pylist() == ["rank"]
    assert got.column("flagged").null_count == len(xq)  # decided in the ranking pass
    assert got.schema.names[3:7] == ["percentile", "p_value", "p_value_source", "flagged"]


@pytest.mark.parametrize("flags", [FlagConfig("fdr", 0.2), FlagConfig("alpha", 0.05)],
                         ids=["fdr", "alpha"])
def test_score_features_flags_the_partition_as_brute_force_does(small_index, tmp_path, flags):
    """Through a real pipeline: each batch scored, the partition's decision taken once
    from every score, each shard flagged: BH over the whole partition's p-values."""
    index_dir, xq = small_index
    batch = _batch(xq)
    staging = tmp_path / "_staging-test"

    def check(decisions):
        (d,) = decisions
        assert d["flags"]["rule"] == flags.rule and d["flags"]["reference_n"] == 30
        assert d["flags"]["flagged"] > 0
        # 30 reference scores: p >= 1/31, above BH's first cut-off 0.2 / 40, said so
        lone = [w for w in d["warnings"] if "lone anomaly cannot be flagged" in w]
        assert len(lone) == (flags.rule == "fdr") == len(d["warnings"])

    with BeamTestPipeline() as p:
        _, decision = (p | beam.Create([batch.slice(0, 13), batch.slice(13)])
                       | ScoreFeatures(index_dir, str(staging), extra_columns=["lot"],
                                       search=SearchConfig(device="cpu"), flags=flags))
        assert_that(decision, check, label="OneDecision")
    got = features.read_table(str(staging), "anomalies")
    p_value = got.column("p_value").to_numpy()
    expected = (brute_bh(p_value, flags.level) if flags.rule == "fdr"
                else p_value <= flags.level)
    np.testing.assert_array_equal(got.column("flagged").to_numpy(zero_copy_only=False),
                                  expected)
    assert expected[-10:].all() and expected.sum() < 20  # the moved rows, few others


def test_heatmap_columns_close_the_fixed_columns_and_are_null_when_scored():
    schema = anomaly_schema(["lot"])
    assert schema.names[-3:] == ["heatmap_uri", "hot_box", "lot"]
    assert schema.field("heatmap_uri").type == pa.string()
    assert schema.field("hot_box").type == pa.list_(pa.int32())
