"""Set scoring stage: feature record batches -> sets of images -> ranked group rows.

Images are grouped into sets by a key (dn2ops.score.grouping): ``parent_dir`` (the
uri's parent directory) or a manifest column. A set is scored either

* ``knn``: its members' features are pooled (``mean`` or ``max``) into one
  (d,) vector, scored like an image against an index of pooled *normal* sets
  (mean Euclidean distance to the k nearest normal sets), or
* ``covtrace``: by the trace of its features' covariance
  (`dn2ops.score.set_features.SetSummary.covtrace`), which needs no normal data.

Sets are never held whole, and no stage holds every set: rows are spilled to disk by
set into buckets (dn2ops.score.spill), each bucket's sets are summarised on their own
(O(d) floats and the member uris a set), and the scored sets are ranked in a second
pass over the written, unranked shards (see ScoreGroups).

Higher = more anomalous in both. Sets of fewer than `MIN_SET_SIZE` images are
not scored: each of their images becomes an error row with stage ``group``,
so the image accounting ``count_in == scored + errored`` still holds (scored
= images in scored sets). Ranks: 1 + the number of strictly higher scores.

kNN sets get a ``p_value`` against the normal sets' reference and are ``flagged`` by
the same rules as images (dn2ops.score.decisions); covtrace sets have no normal sets to
compare with: both null.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import RunInference
from apache_beam.transforms.window import GlobalWindows

from dn2ops.config import POOLS, FlagConfig, GroupConfig, SearchConfig
from dn2ops.index import LoadedIndex
from dn2ops.io import features, outputs
from dn2ops.score import decisions
from dn2ops.score.grouping import MIN_SET_SIZE, GroupKeyError, group_key
from dn2ops.score.images import IndexModelHandler, partition_decision, rank_and_decide
from dn2ops.score.set_features import SetSummary
from dn2ops.score.spill import (
    BUCKET_IMAGES,
    SPILL_DIR,
    SPILL_ROWS,
    SPILL_SCHEMA,
    bucket_of,
    n_buckets,
    read_spilled,
    write_spill,
)

STAGE = "group"  # members of a set too small to score
KEY_STAGE = "group_key"  # an image with no value for --group-by
ERRORS = "group_errors"  # tag of the error output of ScoreGroups
COVTRACE_NO_FLAGS = ("--group-score covtrace scores each set by its own spread, against no "
                     "normal sets: there is no p-value to flag sets by")


def group_schema() -> pa.Schema:
    """The columns of ``groups-*.parquet``."""
    return pa.schema([
        ("group", pa.string()), ("score", pa.float64()), ("rank", pa.int64()),
        ("size", pa.int64()), ("member_uris", pa.list_(pa.string())),
        ("neighbor_groups", pa.list_(pa.string())),
        ("neighbor_distances", pa.list_(pa.float64())), ("percentile", pa.float64()),
        ("p_value", pa.float64()), ("p_value_source", pa.string()), ("flagged", pa.bool_()),
        ("method", pa.string()), ("pool", pa.string()), ("group_by", pa.string()),
        ("partition", pa.string()), ("backbone", pa.string()), ("index_id", pa.string())])


def _too_small(name: str, size: int) -> str:
    return (f"group {name!r} has {size} image(s); a set needs at least {MIN_SET_SIZE} "
            "to be scored")


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
               "p_value": None, "p_value_source": None, "flagged": None,
               "method": self.method, "pool": None if covtrace else self.pool,
               "group_by": self.key, "partition": self.partition,
               "backbone": backbone, "index_id": None,
               "pooled": None if covtrace else summary.pooled(self.pool)}


def score_group_batch(groups: Sequence[dict[str, Any]], index: LoadedIndex
                      ) -> list[dict[str, Any]]:
    """Pooled group rows -> kNN-scored group rows with their p-values (``rank`` and
    ``flagged`` still None, ``pooled`` dropped)."""
    xq = np.stack([g["pooled"] for g in groups])
    scores, D, I = index.search(xq)
    pct = index.percentile(scores)
    pv, source = index.p_values(scores)
    out = []
    for g, s, p, d, i, pval, src in zip(groups, scores, pct, D, I, pv, source, strict=True):
        row = {key: v for key, v in g.items() if key != "pooled"}
        out.append({**row, "score": float(s), "percentile": float(p), "p_value": float(pval),
                    "p_value_source": str(src),
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
    ``directory`` (group_schema), image error rows (stages 'group_key' and 'group'), the
    partition's decision: a singleton, decisions.decide under ``flags`` for kNN sets).

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
    strictly higher scores) and flagged. Each pass is parallel: over bundles, buckets,
    shards.
    Nothing under a dot-folder is committed.
    """

    def __init__(self, group: GroupConfig, directory: str, *, images: Any,
                 index_dir: str | None = None, partition: str = "", batch_size: int = 256,
                 search: SearchConfig = SearchConfig(), bucket_images: int = BUCKET_IMAGES,
                 spill_rows: int = SPILL_ROWS, flags: FlagConfig = FlagConfig()):
        super().__init__()
        if not group.covtrace and (not index_dir or group.pool not in POOLS):
            raise ValueError("kNN group scoring needs an index built with --group-by and a pool")
        self.group, self.directory, self.images = group, directory, images
        self.bucket_images, self.spill_rows = bucket_images, spill_rows
        self.index_dir, self.partition = index_dir, partition
        self.handler = GroupIndexModelHandler(
            index_dir, partition=partition, search=search, max_batch_size=batch_size)
        self.decide = (functools.partial(_no_decision, why=COVTRACE_NO_FLAGS) if group.covtrace
                       else functools.partial(partition_decision, index_dir=index_dir,
                                              rule=flags))

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
        scores = groups | "Scores" >> beam.Map(lambda r: np.array([r["score"]], np.float64))
        written, decision = rank_and_decide(unranked, scores, self.directory, self.decide)
        errors = (spilled[ERRORS], pooled[ERRORS]) | "Errors" >> beam.Flatten()
        return written, errors, decision


def _no_decision(sorted_scores: np.ndarray, why: str) -> dict[str, Any]:
    return decisions.no_decision(why)
