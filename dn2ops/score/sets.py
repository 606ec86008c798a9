"""Set scoring stage: feature record batches -> sets of images -> ranked group rows.

Images are grouped into sets by a key: ``parent_dir`` (the uri's parent
directory) or a manifest column. A set is scored either

* ``knn``: its members' features are pooled (``mean`` or ``max``) into one
  (d,) vector, scored like an image against an index of pooled *normal* sets
  (mean Euclidean distance to the k nearest normal sets), or
* ``covtrace``: by the trace of its features' covariance
  (`dn2ops.score.set_features.SetSummary.covtrace`), which needs no normal data.

Sets are never held whole, and no stage holds every set: rows are spilled to disk by
set into buckets, each bucket's sets are summarised on their own (O(d) floats and the
member uris a set), and the scored sets are ranked in a second pass over the written,
unranked shards (see ScoreGroups).

Higher = more anomalous in both. Sets of fewer than `MIN_SET_SIZE` images are
not scored: each of their images becomes an error row with stage ``group``,
so the image accounting ``count_in == scored + errored`` still holds (scored
= images in scored sets). Ranks: 1 + the number of strictly higher scores.
"""

from __future__ import annotations

import hashlib
import posixpath
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import RunInference
from apache_beam.transforms.window import GlobalWindows

from dn2ops.config import POOLS, GroupConfig, IndexConfig, SearchConfig
from dn2ops.index import IndexError_, LoadedIndex, build_index_from_arrays
from dn2ops.io import features, outputs
from dn2ops.score.images import IndexModelHandler, RankShards, SortedScores
from dn2ops.score.set_features import SetSummary, pool_set

PARENT_DIR = "parent_dir"
STAGE = "group"  # members of a set too small to score
KEY_STAGE = "group_key"  # an image with no value for --group-by
MIN_SET_SIZE = 2
ERRORS = "group_errors"  # tag of the error output of ScoreGroups


class GroupKeyError(ValueError):
    """An image has no value for the grouping key."""


def group_key(row: Mapping[str, Any], key: str) -> str:
    """The set an image belongs to: its uri's parent directory, or a manifest column.

    ``key == "parent_dir"`` always means the parent directory of ``row["uri"]``
    (spelled like the uri, e.g. ``gs://b/lot-a``), even if a manifest has a
    column of that name. Raises GroupKeyError if the column is absent or empty.
    """
    if key == PARENT_DIR:
        return posixpath.dirname(row["uri"].rstrip("/"))
    value = row.get(key)
    if value is None or str(value) == "":
        raise GroupKeyError(f"no value in manifest column {key!r} (--group-by {key})")
    return str(value)


def pool_groups(table_rows: Sequence[Mapping[str, Any]], X: np.ndarray, key: str,
                pool: str = "mean"
                ) -> tuple[list[str], list[list[str]], np.ndarray, np.ndarray]:
    """Groups images by ``key`` and pools each set's features.

    ``table_rows[i]`` (with at least ``uri`` and the key column) describes
    ``X[i]``, X float32 (n, d). Returns (group names sorted, member uris of
    each group sorted, pooled float32 (n_groups, d), sizes int64 (n_groups,)).
    Raises GroupKeyError naming how many images have no key.
    """
    if pool not in POOLS:
        raise ValueError(f"--pool must be one of {POOLS}, got {pool!r}")
    if len(table_rows) != len(X):
        raise ValueError(f"{len(table_rows)} rows but {len(X)} feature vectors")
    members: dict[str, list[int]] = {}
    missing = []
    for i, row in enumerate(table_rows):
        try:
            members.setdefault(group_key(row, key), []).append(i)
        except GroupKeyError:
            missing.append(row["uri"])
    if missing:
        raise GroupKeyError(f"{len(missing)} image(s) have no value in manifest column "
                            f"{key!r}, e.g. {missing[0]}")
    names = sorted(members)
    uris, pooled, sizes = [], [], []
    for name in names:
        idx = sorted(members[name], key=lambda i: table_rows[i]["uri"])
        uris.append([table_rows[i]["uri"] for i in idx])
        pooled.append(pool_set(X[idx], pool))
        sizes.append(len(idx))
    d = X.shape[1] if X.ndim == 2 else 0
    return (names, uris, np.stack(pooled) if pooled else np.zeros((0, d), np.float32),
            np.asarray(sizes, np.int64))


def _too_small(name: str, size: int) -> str:
    return (f"group {name!r} has {size} image(s); a set needs at least {MIN_SET_SIZE} "
            "to be scored")


def check_key(key: str, columns: Sequence[str]) -> None:
    """Fails before any work when --group-by names a column the input does not have."""
    if key != PARENT_DIR and key not in columns:
        raise ValueError(f"--group-by {key}: not a manifest column of the input "
                         f"(columns: {list(columns) or 'none'}); use parent_dir or a column")


# -- group index ----------------------------------------------------------------------------

def build_group_index(features_dir: str, output: str, index: IndexConfig,
                      group: GroupConfig) -> dict[str, Any]:
    """INDEX_DIR over the pooled features of the normal sets. Returns the manifest.

    Each indexed vector is one normal set (its ``uri`` in normal.parquet is the
    group name, its ``sha256`` a digest of its members' sha256s). Sets of fewer
    than MIN_SET_SIZE images are left out (counted in the manifest), as they
    would be when scored. The manifest records ``group_by`` and ``pool`` (None: mean).
    """
    group_by, pool = group.group_by, group.pool or "mean"
    outputs.check_writable(output, "index")
    table, X, fmeta = features.load_features(features_dir)
    check_key(group_by, fmeta.get("extra_columns", []))
    rows = table.to_pylist() if table is not None else []
    names, uris, pooled, sizes = pool_groups(rows, X, group_by, pool)
    keep = sizes >= MIN_SET_SIZE
    if not keep.any():
        raise IndexError_(f"no normal set in {features_dir} has {MIN_SET_SIZE} or more images "
                          f"when grouped by {group_by!r} ({len(names)} set(s), "
                          f"{len(X)} image(s))")
    sha = {r["uri"]: r["sha256"] for r in rows}
    digests = [hashlib.sha256("".join(sha[u] for u in members).encode()).hexdigest()
               for members in uris]
    kept_names = [n for n, ok in zip(names, keep, strict=True) if ok]
    kept_digests = [s for s, ok in zip(digests, keep, strict=True) if ok]
    return build_index_from_arrays(
        kept_names, kept_digests, pooled[keep], fmeta, output, index,
        features_dir=features_dir,
        extra={"group_by": group_by, "pool": pool,
               "group_counts": {"images": int(len(X)), "sets": len(names),
                                "sets_indexed": int(keep.sum()),
                                "sets_too_small": int((~keep).sum()),
                                "images_in_indexed_sets": int(sizes[keep].sum())}})


def check_index_mode(manifest: Mapping[str, Any], group_by: str | None,
                     pool: str | None) -> str | None:
    """Refuses an image index for set scoring and a set index for image scoring.

    Returns the pool to score with: the index's (a different ``pool`` is refused,
    since pooled sets are only comparable when pooled alike).
    """
    built_with = manifest.get("group_by")
    if group_by and not built_with:
        raise IndexError_("the index was built over single images, not sets: rebuild it with "
                          "`dn2 build-index --group-by KEY` to score with --group-by, "
                          "or use --group-score covtrace (no index)")
    if built_with and not group_by:
        raise IndexError_(f"the index was built over sets (--group-by {built_with}, --pool "
                          f"{manifest.get('pool')}): score with --group-by, or build an "
                          "image index without --group-by")
    if not group_by:
        return None
    if pool and pool != manifest.get("pool"):
        raise IndexError_(f"--pool {pool} but the index pooled its sets with --pool "
                          f"{manifest.get('pool')}; use the same pooling")
    return manifest.get("pool")


# -- Beam ---------------------------------------------------------------------------------

def group_schema() -> pa.Schema:
    """The columns of ``groups-*.parquet``."""
    return pa.schema([
        ("group", pa.string()), ("score", pa.float64()), ("rank", pa.int64()),
        ("size", pa.int64()), ("member_uris", pa.list_(pa.string())),
        ("neighbor_groups", pa.list_(pa.string())),
        ("neighbor_distances", pa.list_(pa.float64())), ("percentile", pa.float64()),
        ("method", pa.string()), ("pool", pa.string()), ("group_by", pa.string()),
        ("partition", pa.string()), ("backbone", pa.string()), ("index_id", pa.string())])


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


class _SpillToBuckets(beam.DoFn):
    """Feature record batch -> its rows, each tagged with its set's bucket (bucket_of),
    buffered up to ``spill_rows`` and then written as one spill file (write_spill) under
    ``directory/.sets/``; each (bucket, (file, row group)) is output when the bundle
    finishes. An image without a key -> an error row.

    ``images``: the number of images (an int, or a side input), which sets the number of
    buckets (n_buckets, ``bucket_images`` a bucket). A retried bundle writes new files;
    only the files of bundles that succeeded are output, so a failed attempt's files are
    never read.
    """

    def __init__(self, key: str, directory: str, bucket_images: int = BUCKET_IMAGES,
                 spill_rows: int = SPILL_ROWS):
        self.key, self.directory = key, directory
        self.bucket_images, self.spill_rows = bucket_images, spill_rows

    def start_bundle(self):
        self._tables: list[pa.Table] = []
        self._buffered = 0
        self._parts: list[tuple[int, tuple[str, int]]] = []

    def process(self, batch: pa.RecordBatch, images: int) -> Iterator[Any]:
        uris = batch.column("uri").to_pylist()
        values = (batch.column(self.key).to_pylist() if self.key in batch.schema.names
                  else [None] * len(uris))
        buckets = n_buckets(images, self.bucket_images)
        names, keep = [], []
        for i, (uri, value) in enumerate(zip(uris, values, strict=True)):
            try:
                names.append(group_key({"uri": uri, self.key: value}, self.key))
            except GroupKeyError as e:
                yield beam.pvalue.TaggedOutput(ERRORS, {"uri": uri, "stage": KEY_STAGE,
                                                        "error": str(e)})
                continue
            keep.append(i)
        if not keep:
            return
        rows = batch if len(keep) == len(uris) else batch.take(pa.array(keep))
        embedding = rows.column("embedding")
        if embedding.type != SPILL_SCHEMA.field("embedding").type:
            embedding = embedding.cast(SPILL_SCHEMA.field("embedding").type)
        self._tables.append(pa.Table.from_arrays(
            [pa.array([bucket_of(n, buckets) for n in names], pa.int32()),
             pa.array(names, pa.string()), rows.column("uri"), rows.column("backbone"),
             embedding], schema=SPILL_SCHEMA))
        self._buffered += len(keep)
        if self._buffered >= self.spill_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._tables:
            return
        path = outputs.join(self.directory, SPILL_DIR, f"spill-{uuid.uuid4().hex}.parquet")
        parts = write_spill(pa.concat_tables(self._tables), path)
        self._parts.extend((bucket, (path, row_group)) for bucket, row_group in parts)
        self._tables, self._buffered = [], 0

    def finish_bundle(self) -> Iterator[Any]:
        self._flush()
        for part in self._parts:
            yield GlobalWindows.windowed_value(part)
        self._parts = []


class _SummariseBucket(beam.DoFn):
    """(bucket, its spilled (file, row group)s) -> one unscored group row a set of the
    bucket, with its pooled vector (covtrace: scored); the members of a set too small to
    score -> error rows. Only this bucket's sets are in memory: a SetSummary and the
    member uris each."""

    def __init__(self, key: str, method: str, pool: str | None, partition: str):
        self.key, self.method, self.pool, self.partition = key, method, pool, partition

    def process(self, kv: tuple[int, Iterable[tuple[str, int]]]) -> Iterator[Any]:
        bucket, parts = kv
        covtrace = self.method == "covtrace"
        sets: dict[str, list[Any]] = {}  # name -> [SetSummary, member uris, backbone]
        for path, row_group in sorted({tuple(part) for part in parts}):
            table = read_spilled(path, row_group, bucket)
            for batch in table.to_batches(max_chunksize=features.READ_BATCH_ROWS):
                X = features.embeddings(batch)
                names = batch.column("group").to_pylist()
                uris = batch.column("uri").to_pylist()
                backbones = batch.column("backbone").to_pylist()
                members: dict[str, list[int]] = {}
                for i, name in enumerate(names):
                    members.setdefault(name, []).append(i)
                for name, idx in members.items():
                    part = SetSummary.of(X[idx], None if covtrace else self.pool, covtrace)
                    entry = sets.get(name)
                    if entry is None:
                        sets[name] = [part, [uris[i] for i in idx], backbones[idx[0]]]
                    else:
                        entry[0].merge(part)
                        entry[1].extend(uris[i] for i in idx)
        for name in sorted(sets):
            yield from self._row(name, *sets.pop(name))

    def _row(self, name: str, summary: SetSummary, uris: list[str], backbone: str
             ) -> Iterator[Any]:
        uris = sorted(uris)
        if len(uris) < MIN_SET_SIZE:
            for uri in uris:
                yield beam.pvalue.TaggedOutput(ERRORS, {"uri": uri, "stage": STAGE,
                                                        "error": _too_small(name, len(uris))})
            return
        covtrace = self.method == "covtrace"
        yield {"group": name, "score": summary.covtrace() if covtrace else None,
               "rank": None, "size": len(uris), "member_uris": uris,
               "neighbor_groups": [], "neighbor_distances": [], "percentile": None,
               "method": self.method, "pool": None if covtrace else self.pool,
               "group_by": self.key, "partition": self.partition,
               "backbone": backbone, "index_id": None,
               "pooled": None if covtrace else summary.pooled(self.pool)}


def score_group_batch(groups: Sequence[dict[str, Any]], index: LoadedIndex
                      ) -> list[dict[str, Any]]:
    """Pooled group rows -> kNN-scored group rows (``rank`` still None, ``pooled`` dropped)."""
    xq = np.stack([g["pooled"] for g in groups])
    scores, D, I = index.search(xq)
    pct = index.percentile(scores)
    out = []
    for g, s, p, d, i in zip(groups, scores, pct, D, I, strict=True):
        row = {key: v for key, v in g.items() if key != "pooled"}
        out.append({**row, "score": float(s), "percentile": float(p),
                    "neighbor_groups": [index.uris[j] for j in i],
                    "neighbor_distances": [float(x) for x in d], "index_id": index.index_id})
    return out


class GroupIndexModelHandler(IndexModelHandler):
    """RunInference's view of an index of sets: pooled group rows -> kNN-scored group rows
    (score_group_batch), batched by RunInference like any model's inputs."""

    def run_inference(self, batch: Sequence[dict[str, Any]], model: LoadedIndex,
                      inference_args: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return score_group_batch(batch, model)

    def get_num_bytes(self, batch: Sequence[dict[str, Any]]) -> int:
        return sum(g["pooled"].nbytes for g in batch)


class ScoreGroups(beam.PTransform):
    """Feature record batches -> (the paths of the ranked ``groups-*.parquet`` written in
    ``directory`` (group_schema), image error rows (stages 'group_key' and 'group')).

    ``group.method`` knn needs ``index_dir`` (an index built with --group-by) and a
    ``group.pool``; covtrace needs neither. ``images``: how many images are coming (an
    int, or a singleton PCollection computed upstream of ``batches``' stage, such as the
    listing's count), which sets the number of buckets (``bucket_images`` images a
    bucket; ``spill_rows``: rows a worker buffers before it writes them).

    Memory does not grow with the images (issue 19): pass 1 spills the rows by their
    sets' buckets (files of ``spill_rows`` rows, a row group a bucket, under
    ``directory/.sets/``); pass 2 summarises one bucket at a time (SetSummary: O(d)
    floats a set), scores its sets and writes them unranked under
    ``directory/.unranked/`` while their scores are combined into one sorted array (8
    bytes a set); pass 3 rewrites each unranked shard ranked (rank = 1 + the number of
    strictly higher scores). Each pass is parallel: over bundles, buckets, shards.
    Nothing under a dot-folder is committed.
    """

    def __init__(self, group: GroupConfig, directory: str, *, images: Any,
                 index_dir: str | None = None, partition: str = "", batch_size: int = 256,
                 search: SearchConfig = SearchConfig(), bucket_images: int = BUCKET_IMAGES,
                 spill_rows: int = SPILL_ROWS):
        super().__init__()
        if not group.covtrace and (not index_dir or group.pool not in POOLS):
            raise ValueError("kNN group scoring needs an index built with --group-by and a pool")
        self.group, self.directory, self.images = group, directory, images
        self.bucket_images, self.spill_rows = bucket_images, spill_rows
        self.index_dir, self.partition = index_dir, partition
        self.handler = GroupIndexModelHandler(
            index_dir, partition=partition, search=search, max_batch_size=batch_size)

    def expand(self, batches):
        g = self.group
        images = (self.images if isinstance(self.images, int)
                  else beam.pvalue.AsSingleton(self.images))
        spilled = batches | "Spill" >> beam.ParDo(
            _SpillToBuckets(g.group_by, self.directory, self.bucket_images, self.spill_rows),
            images=images
        ).with_outputs(ERRORS, main="files")
        pooled = (spilled.files
                  | "Buckets" >> beam.GroupByKey()
                  | "Summarise" >> beam.ParDo(_SummariseBucket(
                      g.group_by, g.method, g.pool, self.partition)
                  ).with_outputs(ERRORS, main="groups"))
        groups = pooled.groups
        if not g.covtrace:
            groups = groups | "Knn" >> RunInference(self.handler)
        else:
            groups = groups | "DropPooled" >> beam.Map(
                lambda r: {k: v for k, v in r.items() if k != "pooled"})
        unranked = groups | "WriteUnranked" >> beam.io.WriteToParquet(
            outputs.join(self.directory, ".unranked", "groups"), group_schema(),
            file_name_suffix=".parquet", shard_name_template="-SSSSS-of-NNNNN",
            row_group_buffer_size=features.ROW_GROUP_BYTES)
        sorted_scores = (groups
                         | "Scores" >> beam.Map(lambda r: np.array([r["score"]], np.float64))
                         | "SortedScores" >> beam.CombineGlobally(SortedScores()))
        written = unranked | "Rank" >> beam.ParDo(
            RankShards(self.directory), sorted_scores=beam.pvalue.AsSingleton(sorted_scores))
        errors = (spilled[ERRORS], pooled[ERRORS]) | "Errors" >> beam.Flatten()
        return written, errors
