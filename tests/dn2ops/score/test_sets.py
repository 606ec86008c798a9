"""Group scoring stage: keys, pooling, covtrace, kNN against a set index, ranks, small sets."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dn2ops.config import GroupConfig, IndexConfig
from dn2ops.index import IndexError_, LoadedIndex, build_index_from_arrays
from dn2ops.io import features, outputs
from dn2ops.score.sets import (
    GroupKeyError,
    ScoreGroups,
    build_group_index,
    check_index_mode,
    group_key,
    pool_groups,
)
from pipelines.options import beam_options

META = {"backbone": "test", "dim": 3, "preprocessing": {"resize": 1}}


def _rows(groups: dict[str, np.ndarray], key: str = "lot") -> list[dict]:
    """Feature rows: images named <group>/<j>.png, the group also in a ``lot`` column."""
    rows = []
    for name, X in groups.items():
        for j, x in enumerate(X):
            rows.append({"uri": f"mem://store/{name}/{j:02d}.png", "sha256": f"{name}{j}",
                         "backbone": "test", "dim": len(x),
                         "embedding": [float(v) for v in x], key: name})
    return rows


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
        written, errors = p | beam.Create(batches, reshuffle=False) | ScoreGroups(
            group, results, images=len(rows) if images is None else images, **kwargs)
        errors | "E" >> beam.Map(json.dumps) | "WE" >> beam.io.WriteToText(err)
    shards = sorted(glob.glob(f"{results}/groups-*.parquet"))
    assert shards, "ScoreGroups wrote no groups shard"
    groups = pa.concat_tables([pq.read_table(f) for f in shards]).to_pylist()
    errors = [json.loads(line) for f in sorted(glob.glob(err + "*")) for line in open(f)]
    return sorted(groups, key=lambda g: g["group"]), errors


def test_group_key_parent_dir_and_column():
    assert group_key({"uri": "gs://b/lots/lot-a/x.png"}, "parent_dir") == "gs://b/lots/lot-a"
    assert group_key({"uri": "/data/lot-b/y.png", "lot": "7"}, "parent_dir") == "/data/lot-b"
    assert group_key({"uri": "/data/lot-b/y.png", "lot": "7"}, "lot") == "7"
    for row in ({"uri": "a.png", "lot": ""}, {"uri": "a.png", "lot": None}, {"uri": "a.png"}):
        with pytest.raises(GroupKeyError, match="'lot'"):
            group_key(row, "lot")


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pool_groups_matches_numpy(pool):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5)).astype(np.float32)
    lots = rng.choice(["b", "a", "c"], size=40)
    order = rng.permutation(40)  # rows arrive in any order
    rows = [{"uri": f"u{i:03d}", "lot": lots[i]} for i in order]
    names, uris, pooled, sizes = pool_groups(rows, X[order], "lot", pool)
    assert names == ["a", "b", "c"]
    for name, members, vec, size in zip(names, uris, pooled, sizes, strict=True):
        idx = np.flatnonzero(lots == name)
        assert members == [f"u{i:03d}" for i in idx]  # sorted by uri
        assert size == len(idx)
        expected = X[idx].mean(axis=0) if pool == "mean" else X[idx].max(axis=0)
        np.testing.assert_allclose(vec, expected, rtol=1e-6)
        assert vec.dtype == np.float32


def test_pool_groups_names_images_without_key():
    with pytest.raises(GroupKeyError, match="1 image.*u1"):
        pool_groups([{"uri": "u0", "lot": "a"}, {"uri": "u1", "lot": ""}],
                    np.zeros((2, 3), np.float32), "lot")


def test_covtrace_equals_hand_computed_and_small_sets_become_errors(tmp_path):
    # Set a: [[0,0],[2,0],[0,4]] -> variances (ddof=1) 4/3 and 16/3, trace 20/3.
    # Set b: a shifted by +10 -> the same spread, the same score, the same rank.
    # Set c: [[0,0],[1,1]] -> variances 1/2 and 1/2, trace 1.
    a = np.array([[0, 0], [2, 0], [0, 4]], float)
    groups = {"a": a, "b": a + 10, "c": np.array([[0, 0], [1, 1]], float),
              "solo": np.array([[5, 5]], float)}
    rows = _rows(groups)
    rows.append({**rows[0], "uri": "mem://store/nokey.png", "lot": ""})
    got, errors = _run_groups(rows, tmp_path, key="lot", method="covtrace", pool=None)
    assert [g["group"] for g in got] == ["a", "b", "c"]
    np.testing.assert_allclose([g["score"] for g in got], [20 / 3, 20 / 3, 1.0], rtol=1e-9)
    assert [g["rank"] for g in got] == [1, 1, 3]  # ties share the better rank
    assert [g["size"] for g in got] == [3, 3, 2]
    assert got[2]["member_uris"] == ["mem://store/c/00.png", "mem://store/c/01.png"]
    assert all(g["neighbor_groups"] == [] and g["index_id"] is None for g in got)
    assert all(g["method"] == "covtrace" and g["group_by"] == "lot" for g in got)
    by_uri = {e["uri"]: e for e in errors}
    assert set(by_uri) == {"mem://store/solo/00.png", "mem://store/nokey.png"}
    assert by_uri["mem://store/solo/00.png"]["stage"] == "group"
    assert "'solo' has 1 image" in by_uri["mem://store/solo/00.png"]["error"]
    assert by_uri["mem://store/nokey.png"]["stage"] == "group_key"


def test_parent_dir_groups_by_folder(tmp_path):
    rng = np.random.default_rng(1)
    groups = {"x": rng.normal(size=(4, 3)), "y": rng.normal(size=(3, 3))}
    got, errors = _run_groups(_rows(groups), tmp_path, key="parent_dir", method="covtrace",
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
    got, errors = _run_groups(_rows(queries), tmp_path, key="lot", method="knn", pool=pool,
                              index_dir=index_dir)
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


def _features_dir(path, rows: list[dict], extra_columns=("lot",)) -> str:
    """A committed features directory holding ``rows``."""
    directory = str(path)
    staging = outputs.new_staging(directory)
    fs, stage = outputs.fs_and_path(staging)
    fs.makedirs(stage, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=features.feature_schema(extra_columns))
    pq.write_table(table, f"{stage}/features-00000-of-00001.parquet")
    outputs.commit(staging, directory, {"kind": features.KIND, **META,
                                        "extra_columns": list(extra_columns)})
    return directory


def test_build_group_index_pools_sets_and_drops_small_ones(tmp_path):
    rng = np.random.default_rng(3)
    groups = {f"lot{i}": rng.normal(size=(3 + i, 3)) for i in range(4)}
    groups["tiny"] = rng.normal(size=(1, 3))
    fdir = _features_dir(tmp_path / "f", _rows(groups))
    manifest = build_group_index(fdir, str(tmp_path / "idx"), IndexConfig(),
                                 GroupConfig(group_by="lot", pool="max"))
    assert manifest["group_by"] == "lot" and manifest["pool"] == "max"
    assert manifest["group_counts"] == {"images": 19, "sets": 5, "sets_indexed": 4,
                                        "sets_too_small": 1, "images_in_indexed_sets": 18}
    loaded = LoadedIndex(str(tmp_path / "idx"))
    assert loaded.uris == ["lot0", "lot1", "lot2", "lot3"]
    expected = np.stack([groups[n].astype(np.float32).max(axis=0) for n in loaded.uris])
    np.testing.assert_allclose(np.concatenate(list(loaded.iter_shards())), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="not a manifest column"):
        build_group_index(fdir, str(tmp_path / "idx2"), IndexConfig(),
                          GroupConfig(group_by="camera"))


def test_index_mode_is_checked_both_ways():
    image_index = {"backbone": "test"}
    set_index = {"group_by": "lot", "pool": "mean"}
    assert check_index_mode(image_index, None, None) is None
    assert check_index_mode(set_index, "parent_dir", None) == "mean"
    with pytest.raises(IndexError_, match="single images"):
        check_index_mode(image_index, "lot", None)
    with pytest.raises(IndexError_, match="built over sets"):
        check_index_mode(set_index, None, None)
    with pytest.raises(IndexError_, match="--pool max"):
        check_index_mode(set_index, "lot", "max")


def test_sets_spilled_into_many_buckets_score_as_in_one(tmp_path):
    """Many buckets and many small spills (each set's members written in several files)
    give the table of one bucket, and both equal numpy: covtrace, sizes, members, ranks."""
    rng = np.random.default_rng(4)
    groups = {f"lot{i:02d}": rng.normal(size=(int(rng.integers(1, 7)), 4)) * (1 + i % 5)
              for i in range(40)}
    rows = _rows(groups)
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


def test_buckets_are_the_same_in_every_process():
    """A set's bucket must not depend on the process (workers spill, others summarise):
    another interpreter, with another string-hash seed, puts every set in the same bucket."""
    from dn2ops.score.sets import bucket_of, n_buckets

    names = [f"lot{i}" for i in range(50)] + ["gs://b/cam-7/2026-12-01", "ü"]
    code = ("import json, sys; from dn2ops.score.sets import bucket_of; "
            "print(json.dumps([bucket_of(n, 13) for n in json.loads(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], check=True,
                         capture_output=True, text=True, env={"PYTHONHASHSEED": "123"},
                         cwd=str(Path(__file__).parents[2]))
    mine = [bucket_of(n, 13) for n in names]
    assert json.loads(out.stdout) == mine
    assert len(set(mine)) > 8  # spread over the buckets
    assert [n_buckets(i, 10) for i in (0, 1, 10, 11, 95)] == [1, 1, 1, 2, 10]


def test_spill_file_has_a_row_group_a_bucket(tmp_path):
    """write_spill sorts rows by bucket into one row group each; read_spilled gives back
    exactly a bucket's rows and refuses a row group that is another bucket's."""
    from dn2ops.score.sets import SPILL_SCHEMA, read_spilled, write_spill

    buckets = [3, 0, 3, 1, 0, 3]
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    table = pa.Table.from_pydict(
        {"bucket": buckets, "group": [f"g{b}" for b in buckets],
         "uri": [f"u{i}" for i in range(6)], "backbone": ["test"] * 6,
         "embedding": [list(x) for x in X]}, schema=SPILL_SCHEMA)
    path = str(tmp_path / "spill.parquet")
    parts = write_spill(table, path)
    assert parts == [(0, 0), (1, 1), (3, 2)]
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    for bucket, row_group in parts:
        got = read_spilled(path, row_group, bucket)
        want = [i for i, b in enumerate(buckets) if b == bucket]
        assert got.column("uri").to_pylist() == [f"u{i}" for i in want]  # stable order
        np.testing.assert_array_equal(features.embeddings(got), X[want])
    with pytest.raises(ValueError, match="holds buckets \\[1\\], not 3"):
        read_spilled(path, 1, 3)
