"""Feature reuse (``dn2 embed --reuse FEATURES_DIR``): images already embedded in an
earlier features directory are copied from it, not decoded and embedded again.

An image is known when its sha256 (of the file's bytes) appears among the earlier
directory's feature rows and that directory was made with the same backbone,
preprocessing and weights (``check_reusable``). Each worker loads the earlier digests
once (``Known``: 32 bytes and a location an image); PrepareImages hashes an image
before decoding it and hands a known one on as (key, Location). ``CopyFeatures`` then
reads only the row groups of the earlier shards that hold known rows and writes them
under the new uri and manifest columns. Images that errored earlier are not known:
they are tried again.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dn2ops.io import features, outputs


class Location(NamedTuple):
    """Where a known image's features are: shard index (in the directory's committed
    order) and row within it."""

    shard: int
    row: int


def check_reusable(features_dir: str, metadata: dict[str, Any], weights_sha256: str
                   ) -> dict[str, Any]:
    """The marker of a committed features directory whose rows may be copied into a run
    with backbone ``metadata`` and weights ``weights_sha256``; raises MetadataMismatch
    naming what differs (the backbone, dimension, preprocessing or weights)."""
    marker = outputs.require_complete(features_dir, features.KIND)
    features.check_compatible(metadata, marker, f"--reuse {features_dir} and this run's "
                              "embedding", names=("this run", "--reuse"))
    earlier = marker.get("weights_sha256")
    if earlier is None:
        raise features.MetadataMismatch(
            f"--reuse {features_dir} records no weights_sha256 (written before dn2 "
            "recorded the weights): its features cannot be checked against this run's "
            "weights; embed without --reuse once to make a directory that can be reused")
    if earlier != weights_sha256:
        raise features.MetadataMismatch(
            f"--reuse {features_dir} was embedded with other weights (sha256 "
            f"{earlier[:12]}..., this run {weights_sha256[:12]}...): its features "
            "cannot be reused")
    return marker


def _digests(hexes: Sequence[str]) -> np.ndarray:
    """sha256 hex strings -> one 'S32' array of the raw digests."""
    if not len(hexes):
        return np.zeros(0, "S32")
    joined = "".join(hexes)
    try:
        if len(joined) != 64 * len(hexes):
            raise ValueError("not 64 digits each")
        return np.frombuffer(binascii.unhexlify(joined), "S32")
    except (ValueError, binascii.Error) as e:
        raise features.MetadataMismatch(
            f"feature rows' sha256 values are not sha256 hex digests ({e}): not dn2 "
            "feature shards") from None


class Known:
    """The distinct image digests of a features directory, each with the Location of
    its first row (shards in committed order, then rows)."""

    def __init__(self, digests: np.ndarray, shards: np.ndarray, rows: np.ndarray):
        order = np.argsort(digests, kind="stable")  # the first row of a digest stays first
        digests, shards, rows = digests[order], shards[order], rows[order]
        first = np.ones(len(digests), bool)
        first[1:] = digests[1:] != digests[:-1]
        self.digests, self.shards, self.rows = digests[first], shards[first], rows[first]

    @classmethod
    def load(cls, features_dir: str) -> Known:
        """Reads the ``sha256`` column of every committed shard (64 bytes a row)."""
        fs, _ = outputs.fs_and_path(features_dir)
        parts, shards, rows = [], [], []
        for i, path in enumerate(features.shard_paths(features_dir, "features")):
            with fs.open(outputs.fs_and_path(path)[1], "rb") as f:
                hexes = pq.read_table(f, columns=["sha256"]).column(0).to_pylist()
            parts.append(_digests(hexes))
            shards.append(np.full(len(hexes), i, np.int32))
            rows.append(np.arange(len(hexes), dtype=np.int64))
        if not parts:
            return cls(np.zeros(0, "S32"), np.zeros(0, np.int32), np.zeros(0, np.int64))
        return cls(np.concatenate(parts), np.concatenate(shards), np.concatenate(rows))

    def __len__(self) -> int:
        return len(self.digests)

    def find(self, sha256: str) -> Location | None:
        """The Location of an image's features, or None when the directory lacks it."""
        q = _digests([sha256])
        i = int(np.searchsorted(self.digests, q[0]))
        if i < len(self.digests) and self.digests[i] == q[0]:
            return Location(int(self.shards[i]), int(self.rows[i]))
        return None


def _tables_by_shard(batch: Sequence[tuple[Any, Location]]) -> Iterator[tuple[int, pa.Table]]:
    """A batch of (ImageKey, Location) -> (shard, compact table of its keys) per shard."""
    by_shard: dict[int, list] = defaultdict(list)
    for key, loc in batch:
        by_shard[loc.shard].append((loc.row, key.uri, key.sha256, json.dumps(key.extras)))
    for shard, keys in by_shard.items():
        row, uri, sha, extras = zip(*keys, strict=True)
        yield shard, pa.table({"row": pa.array(row, pa.int64()), "uri": list(uri),
                               "sha256": list(sha), "extras": list(extras)})


class _CopyRows(beam.DoFn):
    """(shard index, shard path) -> the feature record batches (``schema``) of the keys
    that want that shard: their rows taken from the shard's read batches, under the
    keys' uris and manifest columns, never one Python object a row."""

    def __init__(self, backbone: str, schema: pa.Schema, checksums: Sequence[str] = ()):
        self.backbone, self.schema, self.checksums = backbone, schema, tuple(checksums)

    def process(self, shard: tuple[int, str], wanted) -> Iterator[pa.RecordBatch]:
        index, path = shard
        parts = list(wanted[index])
        if not parts:
            return
        keys = pa.concat_tables(parts).sort_by("row")
        at = keys.column("row").to_numpy()
        fs, p = outputs.fs_and_path(path)
        with contextlib.ExitStack() as stack:
            if self.checksums:  # a piece: small, read whole and checked before it is used
                data = fs.cat_file(p)
                if hashlib.sha256(data).hexdigest() != self.checksums[index]:
                    raise outputs.OutputError(
                        f"{path} changed after this run checked it against its seal (its "
                        "sha256 is no longer the sealed one): not used; run again")
                f = pa.BufferReader(data)
            else:
                f = stack.enter_context(fs.open(p, "rb"))
            pf = pq.ParquetFile(f, buffer_size=1 << 22, pre_buffer=False)
            for start, batch in _wanted_batches(pf, at):
                lo, hi = np.searchsorted(at, [start, start + batch.num_rows])
                yield self._batch(keys.slice(lo, hi - lo), batch, start, path)

    def _batch(self, keys: pa.Table, batch: pa.RecordBatch, start: int, path: str
               ) -> pa.RecordBatch:
        taken = batch.take(pa.array(keys.column("row").to_numpy() - start))
        sha = taken.column("sha256")
        if not sha.equals(keys.column("sha256").combine_chunks().cast(sha.type)):
            raise outputs.OutputError(
                f"{path} changed while this run read it (a row's sha256 is no longer the "
                "one its digests said); run again")
        emb = taken.column("embedding").cast(pa.list_(pa.float32()))
        dims = pc.list_value_length(emb).cast(pa.int32())
        extras = [dict(json.loads(e)) for e in keys.column("extras").to_pylist()]
        n = taken.num_rows
        cols = {"uri": keys.column("uri").combine_chunks(), "sha256": sha,
                "backbone": pa.array([self.backbone] * n, pa.string()), "dim": dims,
                "embedding": emb}
        for f in self.schema:
            if f.name not in cols:
                cols[f.name] = pa.array([e.get(f.name) for e in extras], f.type)
        return pa.RecordBatch.from_arrays([cols[f.name].cast(f.type) for f in self.schema],
                                          schema=self.schema)


def _wanted_batches(pf: pq.ParquetFile, at: np.ndarray
                    ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row, record batch) of the row groups holding any row in ``at`` (sorted)."""
    start = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = np.searchsorted(at, [start, start + n])
        if hi > lo:
            for batch in pf.iter_batches(batch_size=features.READ_BATCH_ROWS, row_groups=[g],
                                         columns=["sha256", "embedding"]):
                yield start, batch
                start += batch.num_rows
        else:
            start += n
    if len(at) and at[-1] >= start:
        raise outputs.OutputError(f"a features shard has {start} rows, fewer than the "
                                  f"{at[-1] + 1} its digests said: it changed; run again")


class CopyFeatures(beam.PTransform):
    """(ImageKey, Location) of known images -> their feature rows as record batches of
    ``features.feature_schema(extra_columns)``, copied from ``features_dir`` (its
    committed shards, in the order Known.load numbered them).

    The keys become a side input of compact Arrow tables (about 150 bytes an image,
    grouped by shard); each earlier shard is then read once, only its row groups that
    hold a wanted row, by whichever worker takes it, and its rows leave as the record
    batches they were read in (at most features.READ_BATCH_ROWS rows): a copied row is
    never a Python dict, and a run writes or scores the batches as they are
    (pipelines.graphs).
    """

    def __init__(self, features_dir: str | None, backbone: str, *,
                 paths: Sequence[str] | None = None, checksums: Sequence[str] = (),
                 extra_columns: Sequence[str] = ()):
        super().__init__()
        self.schema = features.feature_schema(extra_columns)
        # checksums: the sha256 of each of ``paths``' bytes (sealed pieces): each file is
        # read whole and checked before a row of it is copied
        self.checksums = tuple(checksums)
        # paths: Parquet files of feature rows to copy from instead of a directory's
        # shards (the sealed pieces a resumed run adopts: dn2ops.embed.resume)
        self.paths = (list(paths) if paths is not None
                      else features.shard_paths(features_dir, "features"))
        self.backbone = backbone

    def expand(self, reused):
        wanted = (reused
                  | "KeyBatches" >> beam.BatchElements(min_batch_size=1, max_batch_size=4096)
                  | "ByShard" >> beam.FlatMap(_tables_by_shard))
        return (reused.pipeline
                | "ReusedShards" >> beam.Create(list(enumerate(self.paths)))
                | "CopyRows" >> beam.ParDo(_CopyRows(self.backbone, self.schema,
                                                     self.checksums),
                                           wanted=beam.pvalue.AsMultiMap(wanted)))
