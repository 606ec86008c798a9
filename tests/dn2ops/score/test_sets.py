"""dn2ops.score.sets, the set scoring stage (ScoreGroups on Beam): covtrace, kNN against a
set index, ranks, small sets and keyless images, many buckets; against numpy and values
computed by hand."""

from __future__ import annotations

import glob
import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dn2ops.config import FlagConfig, GroupConfig, IndexConfig
from dn2ops.index import LoadedIndex, build_index_from_arrays
from dn2ops.io import features
from dn2ops.score.sets import ScoreGroups
from pipelines.options import beam_options
from tests.dn2ops.score.conftest import META, set_rows
from tests.dn2ops.score.test_decisions import brute_bh, brute_p


def _run_groups(rows: list[dict], tmp_path, *, key: str, method: str, pool: str | None,
                images: int | None = None, batch_rows: int = 7, **kwargs
                ) -> tuple[list[dict], list[dict]]:
    """Runs ScoreGroups on the FnApiRunner over the rows in record batches of
    ``batch_rows``; returns (group rows of the ranked shards it wrote, error rows).
    ``images`` (default: the rows) sets the number of buckets."""
    results, err = str(tmp_path / "results"), str(tmp_path / "errors")
    group = GroupConfig(group_by=key, method=method, pool=pool)
    schema = features.feature_schema(["lot"])
    batches = [features.rows_batch(rows[i:i + batch_rows], schema)
               for i in range(0, len(rows), batch_rows)]
    with beam.Pipeline(options=beam_options([])) as p:
        written, errors, _ = p | beam.Create(batches, reshuffle=False) | ScoreGroups(
            group, results, images=len(rows) if images is None else images, **kwargs)
        errors | "E" >> beam.Map(json.dumps) | "WE" >> beam.io.WriteToText(err)
    shards = sorted(glob.glob(f"{results}/groups-*.parquet"))
    assert shards, "ScoreGroups wrote no groups shard"
    groups = pa.concat_tables([pq.read_table(f) for f in shards]).to_pylist()
    errors = [json.loads(line) for f in sorted(glob.glob(err + "*")) for line in open(f)]
    return sorted(groups, key=lambda g: g["group"]), errors


def test_covtrace_equals_hand_computed_and_small_sets_become_errors(tmp_path):
    # Set a: [[0,0],[2,0],[0,4]] -> variances (ddof=1) 4/3 and 16/3, trace 20/3.
    # Set b: a shifted by +10 -> the same spread, the same score, the same rank.
    # Set c: [[0,0],[1,1]] -> variances 1/2 and 1/2, trace 1.
    a = np.array([[0, 0], [2, 0], [0, 4]], float)
    groups = {"a": a, "b": a + 10, "c": np.array([[0, 0], [1, 1]], float),
              "solo": np.array([[5, 5]], float)}
    rows = set_rows(groups)
    rows.append({**rows[0], "uri": "mem://store/nokey.png", "lot": ""})
    got, errors = _run_groups(rows, tmp_path, key="lot", method="covtrace", pool=None)
    assert [g["group"] for g in got] == ["a", "b", "c"]
    np.testing.assert_allclose([g["score"] for g in got], [20 / 3, 20 / 3, 1.0], rtol=1e-9)
    assert [g["rank"] for g in got] == [1, 1, 3]  # ties share the better rank
    assert [g["size"] for g in got] == [3, 3, 2]
    assert got[2]["member_uris"] == ["mem://store/c/00.png", "mem://store/c/01.png"]
    assert all(g["neighbor_groups"] == [] and g["index_id"] is None for g in got)
    assert all(g["method"] == "covtrace" and g["group_by"] == "lot" for g in got)
    # no normal sets: no p-values, no flags
    assert all(g[c] is None for g in got for c in ("p_value", "p_value_source", "flagged"))
    by_uri = {e["uri"]: e for e in errors}
    assert set(by_uri) == {"mem://store/solo/00.png", "mem://store/nokey.png"}
    assert by_uri["mem://store/solo/00.png"]["stage"] == "group"
    assert "'solo' has 1 image" in by_uri["mem://store/solo/00.png"]["error"]
    assert by_uri["mem://store/nokey.png"]["stage"] == "group_key"


def test_parent_dir_groups_by_folder(tmp_path):
    rng = np.random.default_rng(1)
    groups = {"x": rng.normal(size=(4, 3)), "y": rng.normal(size=(3, 3))}
    got, errors = _run_groups(set_rows(groups), tmp_path, key="parent_dir", method="covtrace",
                              pool=None)
    assert [g["group"] for g in got] == ["mem://store/x", "mem://store/y"]
    expected = [groups[n].var(axis=0, ddof=1).sum() for n in ("x", "y")]
    np.testing.assert_allclose([g["score"] for g in got], expected, rtol=1e-5)
    assert errors == []


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_knn_against_a_set_index_equals_brute_force(tmp_path, pool):
    rng = np.random.default_rng(2)
    normal = rng.normal(size=(12, 3)).astype(np.float32)  # 12 pooled normal sets
    names = [f"n{i:02d}" for i in range(12)]
    index_dir = str(tmp_path / "index")
    build_index_from_arrays(names, names, normal, META, index_dir, IndexConfig(k=2),
                            extra={"group_by": "lot", "pool": pool})
    queries = {f"q{i}": rng.normal(size=(int(rng.integers(2, 6)), 3)) * (1 + i)
               for i in range(6)}
    got, errors = _run_groups(set_rows(queries), tmp_path, key="lot", method="knn", pool=pool,
                              index_dir=index_dir, flags=FlagConfig("fdr", 0.3))
    assert errors == []
    loaded = LoadedIndex(index_dir)
    scores = []
    for g in got:
        X = queries[g["group"]].astype(np.float32)
        q = X.mean(axis=0) if pool == "mean" else X.max(axis=0)
        d = np.linalg.norm(normal.astype(np.float64) - q, axis=1)
        nearest = np.argsort(d)[:2]
        assert g["score"] == pytest.approx(d[nearest].mean(), rel=1e-5)
        assert g["neighbor_groups"] == [names[j] for j in nearest]
        np.testing.assert_allclose(g["neighbor_distances"], d[nearest], rtol=1e-5)
        assert g["index_id"] == loaded.index_id and g["pool"] == pool
        expected_pct = 100 * np.mean(loaded.train_scores < g["score"])
        assert g["percentile"] == pytest.approx(expected_pct)
        scores.append(g["score"])
    scores = np.array(scores)
    assert [g["rank"] for g in got] == [1 + int((scores > s).sum()) for s in scores]
    # p-values against the normal sets' reference, flags by BH over the partition's sets
    p = brute_p(scores, loaded.reference.scores)
    np.testing.assert_allclose([g["p_value"] for g in got], p, rtol=1e-12)
    assert {g["p_value_source"] for g in got} == {"rank"}
    assert [g["flagged"] for g in got] == brute_bh(p, 0.3).tolist()
    assert 0 < sum(g["flagged"] for g in got) < len(got)


def test_sets_spilled_into_many_buckets_score_as_in_one(tmp_path):
    """Many buckets and many small spills (each set's members written in several files)
    give the table of one bucket, and both equal numpy: covtrace, sizes, members, ranks."""
    rng = np.random.default_rng(4)
    groups = {f"lot{i:02d}": rng.normal(size=(int(rng.integers(1, 7)), 4)) * (1 + i % 5)
              for i in range(40)}
    rows = set_rows(groups)
    rng.shuffle(rows)  # a set's members arrive apart
    one, one_err = _run_groups(rows, tmp_path / "one", key="lot", method="covtrace",
                               pool=None)
    many, many_err = _run_groups(rows, tmp_path / "many", key="lot", method="covtrace",
                                 pool=None, bucket_images=8, spill_rows=5)
    spilled = glob.glob(str(tmp_path / "many" / "results" / ".sets" / "*.parquet"))
    assert len(spilled) > 10  # a file every 5 rows or more, a row group a bucket in each
    files = [pq.ParquetFile(f) for f in spilled]
    row_groups = [f.read_row_group(i, columns=["bucket"]).column("bucket").to_pylist()
                  for f in files for i in range(f.metadata.num_row_groups)]
    assert all(len(set(rg)) == 1 for rg in row_groups)
    used = {rg[0] for rg in row_groups}
    assert len(used) > 5 and max(used) < -(-len(rows) // 8)  # of ceil(rows / 8) buckets
    assert sum(f.metadata.num_rows for f in files) == len(rows)
    np.testing.assert_allclose([g["score"] for g in many], [g["score"] for g in one],
                               rtol=1e-12)
    strip = [{k: v for k, v in g.items() if k != "score"} for g in many]
    assert strip == [{k: v for k, v in g.items() if k != "score"} for g in one]
    assert sorted(map(json.dumps, many_err)) == sorted(map(json.dumps, one_err))
    scored = {n: X for n, X in groups.items() if len(X) >= 2}
    assert [g["group"] for g in many] == sorted(scored)
    expected = np.array([scored[n].astype(np.float32).astype(np.float64).var(axis=0, ddof=1)
                         .sum() for n in sorted(scored)])  # features are stored float32
    np.testing.assert_allclose([g["score"] for g in many], expected, rtol=1e-9)
    assert [g["rank"] for g in many] == [1 + int((expected > e).sum()) for e in expected]
    assert [g["size"] for g in many] == [len(scored[n]) for n in sorted(scored)]
    assert all(g["member_uris"] == sorted(r["uri"] for r in rows if r["lot"] == g["group"])
               for g in many)
    assert sorted(e["uri"] for e in many_err) == sorted(
        r["uri"] for r in rows if len(groups[r["lot"]]) < 2)
