"""Spilling a set's rows to disk by bucket (dn2ops.score.sets): every worker writes the rows
it sees into files with one row group a bucket, so a bucket's sets can be read back
together, and no stage holds every set.
"""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dn2ops.io import outputs

# A bucket's sets are summarised together, in memory: at most about this many images'
# summaries (O(d) floats a set) and member uris. A worker buffers up to SPILL_ROWS
# feature rows (as Arrow: 5 KB a row at 1280-d) before it writes them out, sorted by
# bucket, as one file with a row group a bucket: one writer open at a time, whatever the
# number of buckets (a writer a bucket cost ~17 MB each, which grew with the images).
BUCKET_IMAGES = 16_384
SPILL_ROWS = 4_096
SPILL_DIR = ".sets"  # under the results' staging: never committed (dn2ops.io.outputs)
SPILL_SCHEMA = pa.schema([("bucket", pa.int32()), ("group", pa.string()),
                          ("uri", pa.string()), ("backbone", pa.string()),
                          ("embedding", pa.list_(pa.float32()))])


def n_buckets(images: int, bucket_images: int = BUCKET_IMAGES) -> int:
    """How many buckets ``images`` images are spilled into (``bucket_images`` a bucket)."""
    return max(1, -(-int(images) // bucket_images))


def bucket_of(group: str, buckets: int) -> int:
    """The bucket of a set: the same in every process and on every machine (Python's
    own string hash is salted per process)."""
    digest = hashlib.blake2b(group.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def write_spill(table: pa.Table, path: str) -> list[tuple[int, int]]:
    """Writes spilled rows (SPILL_SCHEMA) to ``path``, sorted by bucket, one row group a
    bucket. Returns [(bucket, row group index)]."""
    table = table.take(pc.sort_indices(table, [("bucket", "ascending")]))
    buckets = table.column("bucket").to_numpy()
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    stops = np.r_[starts[1:], len(buckets)]
    fs, p = outputs.fs_and_path(path)
    fs.makedirs(posixpath.dirname(p), exist_ok=True)
    with fs.open(p, "wb") as f, pq.ParquetWriter(f, SPILL_SCHEMA, compression="none") as w:
        for start, stop in zip(starts, stops, strict=True):
            w.write_table(table.slice(start, stop - start), row_group_size=stop - start)
    return [(int(buckets[s]), i) for i, s in enumerate(starts)]


def read_spilled(path: str, row_group: int, bucket: int) -> pa.Table:
    """One bucket's rows of a spill file (write_spill), checked to be that bucket's."""
    fs, p = outputs.fs_and_path(path)
    with fs.open(p, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(row_group)
    got = pc.unique(table.column("bucket")).to_pylist()
    if got != [bucket]:
        raise ValueError(f"{path} row group {row_group} holds buckets {got}, not {bucket}: "
                         "a spill file was changed while the job ran")
    return table
