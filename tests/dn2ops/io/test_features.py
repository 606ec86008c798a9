"""dn2ops.io.features: reading feature shards, against pyarrow's own whole-table read."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dn2ops.io import features, outputs


def _committed(directory, write) -> str:
    """Calls write(staging folder) and commits it into ``directory`` as dn2 does."""
    staging = outputs.new_staging(str(directory))
    (directory / staging.rsplit("/", 1)[1]).mkdir(parents=True)
    write(directory / staging.rsplit("/", 1)[1])
    outputs.commit(staging, str(directory), {"kind": features.KIND})
    return str(directory)


def _write(path, X, row_group_size, extra=None):
    n, d = X.shape
    emb = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), d).cast(pa.list_(pa.float32()))
    cols = {"uri": [f"u{i}" for i in range(n)], "sha256": [f"h{i}" for i in range(n)],
            "backbone": ["toy"] * n, "dim": pa.array([d] * n, pa.int32()), "embedding": emb}
    if extra:
        cols["lot"] = extra
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


@pytest.mark.parametrize("batch", [7, 256])
def test_shards_read_in_batches_equal_a_whole_table_read(tmp_path, monkeypatch, batch):
    monkeypatch.setattr(features, "_READ_BATCH", batch)
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 5)).astype(np.float32) for n in (50, 0, 33)]

    def write(staging):
        for s, X in enumerate(parts):
            _write(staging / f"features-{s:05d}-of-00003.parquet", X, row_group_size=20,
                   extra=[f"lot{i % 3}" for i in range(len(X))])

    _committed(tmp_path, write)
    got = list(features.iter_feature_shards(str(tmp_path), columns=None))
    assert len(got) == 3
    for (table, X), s in zip(got, range(3), strict=True):
        ref = pq.read_table(tmp_path / f"features-{s:05d}-of-00003.parquet")
        assert table.column_names == [c for c in ref.column_names if c != "embedding"]
        assert table.to_pydict() == ref.drop_columns(["embedding"]).to_pydict()
        if len(ref):
            want = np.array(ref.column("embedding").to_pylist(), np.float32)
            np.testing.assert_array_equal(X, want)
        else:
            assert X.size == 0
    only = [X for _, X in features.iter_feature_shards(str(tmp_path), columns=("embedding",))]
    np.testing.assert_array_equal(np.concatenate([only[0], only[2]]),
                                  np.concatenate([parts[0], parts[2]]))


@pytest.mark.parametrize("rows", [1, 16, 25, 1000])
def test_embedding_blocks_are_every_shards_rows_in_order_at_most_rows_at_a_time(
        tmp_path, monkeypatch, rows):
    monkeypatch.setattr(features, "_READ_BATCH", 7)
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 4)).astype(np.float32) for n in (50, 0, 33)]

    def write(staging):
        for s, X in enumerate(parts):
            _write(staging / f"features-{s:05d}-of-00003.parquet", X, row_group_size=20)

    _committed(tmp_path, write)
    blocks = list(features.iter_embedding_blocks(str(tmp_path), rows))
    assert all(0 < len(b) <= rows for b in blocks)
    # a block never spans two shards: as many blocks as each shard needs
    assert len(blocks) == sum(-(-len(X) // rows) for X in parts)
    np.testing.assert_array_equal(np.concatenate(blocks), np.concatenate(parts))
    with pytest.raises(ValueError, match="at least 1"):
        next(features.iter_embedding_blocks(str(tmp_path), 0))


def test_embeddings_of_different_lengths_are_refused(tmp_path):
    t = pa.table({"uri": ["a", "b"], "embedding": pa.array([[1.0, 2.0], [3.0]],
                                                          pa.list_(pa.float32()))})
    _committed(tmp_path, lambda d: pq.write_table(t, d / "features-00000-of-00001.parquet"))
    with pytest.raises(features.MetadataMismatch, match="different lengths"):
        list(features.iter_feature_shards(str(tmp_path), columns=("uri", "embedding")))
    with pytest.raises(features.MetadataMismatch, match="different lengths"):
        list(features.iter_embedding_blocks(str(tmp_path), 1))


def test_column_names_of_a_table_and_of_none(tmp_path):
    out = _committed(tmp_path / "f", lambda d: _write(
        d / "features-00000-of-00001.parquet", np.zeros((3, 2), np.float32),
        row_group_size=2, extra=["a", "b", "c"]))
    assert features.column_names(out, "features") == [
        "uri", "sha256", "backbone", "dim", "embedding", "lot"]
    assert features.column_names(out, "anomalies") == []
    assert features.read_table(out, "anomalies") is None  # no shard, no schema: no table
    assert features.read_table(out, "features", columns=["lot"]).column(0).to_pylist() == [
        "a", "b", "c"]


def test_readers_take_the_files_success_lists_and_nothing_else(tmp_path):
    X = np.eye(3, dtype=np.float32)
    out = _committed(tmp_path / "f", lambda d: _write(d / "features-00000-of-00001.parquet",
                                                      X, row_group_size=10))
    # a stray shard (a crashed writer's, a hand-copied one) beside the committed ones
    _write(tmp_path / "f" / "features-00001-of-00002.parquet", 2 * X, row_group_size=10)
    assert features.shard_paths(out, "features") == [
        str(tmp_path / "f" / "features-00000-of-00001.parquet")]
    np.testing.assert_array_equal(features.load_features(out)[1], X)
    (tmp_path / "f" / outputs.MARKER).unlink()  # uncommitted: nothing is read
    with pytest.raises(outputs.OutputError, match="no _SUCCESS marker"):
        features.read_table(out, "features")


def test_write_table_takes_float32_arrays_and_writes_bounded_row_groups(tmp_path, monkeypatch):
    """Rows with float32 arrays (as dn2 embed's stage yields them) are written exactly, and
    the writer never holds more than about ROW_GROUP_BYTES before a row group (issue 19)."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline

    from pipelines.options import LOCAL_RUNNER

    monkeypatch.setattr(features, "ROW_GROUP_BYTES", 16 << 10)
    monkeypatch.setattr(features, "RECORD_BATCH_ROWS", 10)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 64)).astype(np.float32)  # 256 bytes a row: 77 KB in all
    rows = [{"uri": f"u{i:03d}", "sha256": f"h{i}", "backbone": "toy", "dim": 64,
             "embedding": x.copy(), "lot": f"lot{i % 4}"} for i, x in enumerate(X)]
    with TestPipeline(runner=LOCAL_RUNNER) as p:
        _ = (p | beam.Create(rows, reshuffle=False)
             | features.WriteTable(str(tmp_path), "features", features.feature_schema(["lot"])))
    [path] = tmp_path.glob("features-*.parquet")
    pf = pq.ParquetFile(path)
    # a row group once 16 KiB of record batches (10 rows of ~2.9 KB each) are held
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    assert sum(sizes) == 300 and max(sizes) <= 16 * 1024 // 256 + 10 and len(sizes) >= 5
    got = pf.read().sort_by("uri")
    assert got.column("embedding").type == pa.list_(pa.float32())
    np.testing.assert_array_equal(features.embeddings(got), X)  # bit for bit
    assert got.column("lot").to_pylist() == [r["lot"] for r in rows]
    assert got.column("dim").to_pylist() == [64] * 300


def test_read_batches_stage_yields_every_row_in_record_batches(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.options import LOCAL_RUNNER

    X = np.arange(30, dtype=np.float32).reshape(10, 3)
    rows = [{"uri": f"u{i}", "sha256": f"h{i}", "backbone": "toy", "dim": 3,
             "embedding": X[i]} for i in range(10)]
    paths = []
    for s, part in enumerate((rows[:4], rows[4:])):
        paths.append(str(tmp_path / f"features-{s}.parquet"))
        pq.write_table(pa.Table.from_batches(
            [features.rows_batch(part, features.feature_schema())]), paths[-1])
    with TestPipeline(runner=LOCAL_RUNNER) as p:
        batches = p | beam.Create(paths) | features.ReadBatches(batch_size=3)
        sizes = batches | "Sizes" >> beam.Map(lambda b: b.num_rows)
        got = batches | beam.FlatMap(lambda b: b.to_pylist()) | beam.Map(
            lambda r: (r["uri"], r["embedding"]))
        assert_that(sizes, equal_to([3, 1, 3, 3]), label="sizes")
        assert_that(got, equal_to([(f"u{i}", X[i].tolist()) for i in range(10)]))
