"""Feature shards: Parquet files ``features-SSSSS-of-NNNNN.parquet``.

Columns: ``uri``, ``sha256`` (of the image bytes), ``backbone``, ``dim``,
``embedding`` (list<float32>, length dim) and any manifest columns (strings).
Rows travel with their embedding as a float32 array, never a list of Python floats.
The backbone metadata (name, dim, preprocessing) is kept in the directory's
``_SUCCESS`` marker and checked before features are mixed or indexed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dn2ops.errors import UserError
from dn2ops.io import outputs

KIND = "features"
ERROR_SCHEMA = pa.schema([("uri", pa.string()), ("stage", pa.string()), ("error", pa.string())])


class MetadataMismatch(UserError, ValueError):
    """Features, index or query come from different backbones or preprocessing."""


def feature_schema(extra_columns: Sequence[str] = ()) -> pa.Schema:
    fields = [("uri", pa.string()), ("sha256", pa.string()), ("backbone", pa.string()),
              ("dim", pa.int32()), ("embedding", pa.list_(pa.float32()))]
    fields += [(c, pa.string()) for c in extra_columns]
    return pa.schema(fields)


# What a writer holds before it writes a row group: Beam's default (64 MiB of record
# batches, built 1000 rows at a time) held about 165 MB at 1280-d (the batches, the
# Parquet encoder's copy, 1000 rows of values) and was reached only after ~14k images,
# so that a run's peak memory seemed to grow with the images up to there (issue 19).
ROW_GROUP_BYTES = 8 << 20
RECORD_BATCH_ROWS = 256


class WriteTable(beam.PTransform):
    """Rows -> ``{prefix}-SSSSS-of-NNNNN.parquet`` files under ``directory``.

    List columns (``embedding``) may be float32 arrays. A writer holds at most about
    ROW_GROUP_BYTES of rows before it writes them as one row group.
    """

    def __init__(self, directory: str, prefix: str, schema: pa.Schema, num_shards: int = 0):
        super().__init__()
        self.path = outputs.join(directory, prefix)
        self.schema = schema
        self.num_shards = num_shards

    def expand(self, rows):
        return rows | beam.io.WriteToParquet(
            self.path, self.schema, file_name_suffix=".parquet", num_shards=self.num_shards,
            shard_name_template="-SSSSS-of-NNNNN", row_group_buffer_size=ROW_GROUP_BYTES,
            record_batch_size=RECORD_BATCH_ROWS)


class WriteBatches(WriteTable):
    """WriteTable for record batches (or tables) of ``schema`` instead of rows, each
    batch written as it comes (a row group or more)."""

    def expand(self, batches):
        return (batches
                | "AsTable" >> beam.Map(_as_table)
                | beam.io.WriteToParquetBatched(
                    self.path, self.schema, file_name_suffix=".parquet",
                    num_shards=self.num_shards, shard_name_template="-SSSSS-of-NNNNN"))


def _as_table(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    return batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])


# Rows a feature shard is read and scored in at once (1280-d: about 5 MB of vectors).
READ_BATCH_ROWS = 1024


def iter_batches(path: str, batch_size: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The record batches of one Parquet file, ``batch_size`` rows at a time (its columns
    read in 4 MiB blocks: a shard may be one row group)."""
    fs, p = outputs.fs_and_path(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f, buffer_size=1 << 22, pre_buffer=False)
        yield from pf.iter_batches(batch_size=batch_size)


class ReadBatches(beam.PTransform):
    """Parquet paths -> their record batches (of ``batch_size`` rows or fewer)."""

    def __init__(self, batch_size: int = READ_BATCH_ROWS):
        super().__init__()
        self.batch_size = batch_size

    def expand(self, paths):
        return paths | beam.FlatMap(iter_batches, batch_size=self.batch_size)


def rows_batch(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    """Feature rows (dicts; embeddings lists or arrays) -> one record batch of ``schema``."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema if f.name != "embedding"}
    X = np.asarray([r["embedding"] for r in rows], np.float32).reshape(len(rows), -1)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), X.shape[1])
    cols["embedding"] = emb.cast(pa.list_(pa.float32()))
    arrays = [cols[f.name] if f.name == "embedding" else pa.array(cols[f.name], f.type)
              for f in schema]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def shard_paths(directory: str, prefix: str) -> list[str]:
    """The ``prefix-*.parquet`` shards of a directory, sorted, spelled like ``directory``.

    A committed directory's shards are the ones its ``_SUCCESS`` lists (never a listing:
    a stray or uncommitted file is not read); a staging folder (``_staging-*``, read only
    by the run that writes it) is listed. Raises OutputError for an uncommitted directory.
    """
    names = (list(outputs.staged_files(directory)) if outputs.is_staging(directory)
             else outputs.committed_files(directory))
    fs, path = outputs.fs_and_path(directory)
    files = [outputs.join(path, n) for n in outputs.matching(names, f"{prefix}-*.parquet")]
    return [fs.unstrip_protocol(p) if "://" in directory else p for p in files]


def read_table(directory: str, prefix: str, columns: Sequence[str] | None = None
               ) -> pa.Table | None:
    """All ``prefix`` shards of a directory as one table; None when it has none (a
    directory that lists no ``prefix`` shard: no rows, and no schema to build one with)."""
    fs, _ = outputs.fs_and_path(directory)
    tables = []
    for p in shard_paths(directory, prefix):
        with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else None


def column_names(directory: str, prefix: str) -> list[str]:
    """The columns of a directory's ``prefix`` shards ([] if none).

    Read from the first shard's footer: one schema writes every shard of a table.
    """
    paths = shard_paths(directory, prefix)
    if not paths:
        return []
    fs, _ = outputs.fs_and_path(directory)
    with fs.open(outputs.fs_and_path(paths[0])[1], "rb") as f:
        return pq.read_schema(f).names


# Rows decoded at once when a shard's embeddings are read into one array.
_READ_BATCH = 256


def iter_feature_shards(directory: str,
                        columns: Sequence[str] | None = ("uri", "sha256", "embedding")
                        ) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Yields (table without embedding, embeddings (n, dim) float32), one shard at a time.

    The embeddings are decoded a batch of rows at a time into one preallocated
    array, so reading a shard costs about one copy of its vectors (not the Arrow
    column plus a combined copy plus the array).
    """
    fs, _ = outputs.fs_and_path(directory)
    for p in shard_paths(directory, "features"):
        with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
            # Column chunks read in 4 MiB blocks, not whole (a shard may be one row group).
            pf = pq.ParquetFile(f, buffer_size=1 << 22, pre_buffer=False)
            names = pf.schema_arrow.names if columns is None else list(columns)
            rest = [c for c in names if c != "embedding"]
            table = pf.read(columns=rest)
            X = (_read_embeddings(pf) if "embedding" in names
                 else np.zeros((pf.metadata.num_rows, 0), np.float32))
        yield table, X


def iter_embedding_blocks(directory: str, rows: int) -> Iterator[np.ndarray]:
    """Every feature shard's embeddings, in order, as float32 blocks (m, dim) of at most
    ``rows`` rows (a block never spans two shards; an empty shard yields nothing): a pass
    over the vectors that holds one block, however large the shards are."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    fs, _ = outputs.fs_and_path(directory)
    dim = 0  # the first row's, which every row must have
    for p in shard_paths(directory, "features"):
        with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
            pf = pq.ParquetFile(f, buffer_size=1 << 22, pre_buffer=False)
            left = pf.metadata.num_rows
            block, at = None, 0
            for batch in pf.iter_batches(batch_size=min(_READ_BATCH, rows),
                                         columns=["embedding"]):
                x = embeddings(batch)
                if len(x) and x.shape[1] != (dim := dim or x.shape[1]):
                    raise MetadataMismatch("feature rows have embeddings of different lengths")
                while len(x):
                    if block is None:
                        block, at = np.empty((min(rows, left), dim), np.float32), 0
                    take = min(len(x), len(block) - at)
                    block[at:at + take] = x[:take]
                    x, at, left = x[take:], at + take, left - take
                    if at == len(block):
                        yield block
                        block = None


def _read_embeddings(pf: pq.ParquetFile) -> np.ndarray:
    n = pf.metadata.num_rows
    X = None
    at = 0
    for batch in pf.iter_batches(batch_size=_READ_BATCH, columns=["embedding"]):
        x = embeddings(batch)
        if X is None:
            X = np.empty((n, x.shape[1]), np.float32)
        elif len(x) and x.shape[1] != X.shape[1]:
            raise MetadataMismatch("feature rows have embeddings of different lengths")
        X[at:at + len(x)] = x
        at += len(x)
    return X if X is not None else np.zeros((0, 0), np.float32)


def embeddings(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``embedding`` column as a float32 array (n, dim)."""
    col = table.column("embedding")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if flat.size % n:
        raise MetadataMismatch("feature rows have embeddings of different lengths")
    return flat.reshape(n, flat.size // n)


def load_features(directory: str) -> tuple[pa.Table | None, np.ndarray, dict[str, Any]]:
    """(rows without embeddings, embeddings (n, dim), marker) of a committed features dir;
    the rows are None when it holds no feature shard (the embeddings then (0, dim))."""
    marker = outputs.require_complete(directory, KIND)
    parts = list(iter_feature_shards(directory, columns=None))
    if not parts:
        return None, np.zeros((0, marker["dim"]), np.float32), marker
    table = pa.concat_tables([t for t, _ in parts], promote_options="default")
    # A shard may hold no rows (a run that copied every row writes its embedded-rows
    # shard empty, and an empty shard says nothing of the dimension).
    X = [x for _, x in parts if len(x)]
    return (table, np.concatenate(X) if X else np.zeros((0, marker["dim"]), np.float32),
            marker)


def check_compatible(expected: dict[str, Any], got: dict[str, Any], what: str,
                     names: tuple[str, str] = ("expected", "got")) -> None:
    """Raises MetadataMismatch naming every field where two backbone metadata differ.

    ``names`` say whose values are whose in the message, e.g. ("index",
    "features") gives ``preprocessing.resize: index 256, features 288``.
    """
    def same(a: Any, b: Any) -> bool:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    diffs = []
    for key in ("backbone", "dim", "preprocessing"):
        a, b = expected.get(key), got.get(key)
        if isinstance(a, dict) and isinstance(b, dict):  # name the sub-fields that differ
            diffs += [f"{key}.{sub}: {names[0]} {a.get(sub)!r}, {names[1]} {b.get(sub)!r}"
                      for sub in sorted(set(a) | set(b)) if not same(a.get(sub), b.get(sub))]
        elif not same(a, b):
            diffs.append(f"{key}: {names[0]} {a!r}, {names[1]} {b!r}")
    if diffs:
        raise MetadataMismatch(f"{what} do not match: " + "; ".join(diffs))


def row_dims(directory: str) -> set[int]:
    """The ``dim`` values of a features directory's rows, from the Parquet footers' statistics.

    Costs one footer read per shard; shards written without statistics fall
    back to reading the (tiny) ``dim`` column.
    """
    fs, _ = outputs.fs_and_path(directory)
    dims: set[int] = set()
    for p in shard_paths(directory, "features"):
        with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except pa.ArrowException as e:  # damaged since dn2 committed it
                raise MetadataMismatch(f"{p} is not a readable Parquet file ({e}): the "
                                       "directory was changed after dn2 wrote it; embed "
                                       "the images again") from None
            col = pf.schema_arrow.get_field_index("dim")
            if col < 0:
                raise MetadataMismatch(f"{p} has no 'dim' column: not a dn2 feature shard")
            for g in range(pf.metadata.num_row_groups):
                stats = pf.metadata.row_group(g).column(col).statistics
                if stats is not None and stats.has_min_max:
                    dims.update({int(stats.min), int(stats.max)})
                else:
                    dims.update(pf.read_row_group(g, columns=["dim"]).column(0).to_pylist())
    return dims
