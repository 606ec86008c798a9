"""Builds dn2's Beam graphs on a given pipeline, without running them.

The scoring stages (dn2ops.score, and with it dn2ops.index: faiss and torch) are
imported by the functions that build their graphs: a worker unpickles this module for
the small functions of every graph, and a worker that only embeds with ONNX Runtime
then imports neither (torch alone is 0.5 GB of RSS a process; docs/memory.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
import pyarrow as pa

from dn2ops.config import FlagConfig, GroupConfig, SearchConfig
from dn2ops.embed.plan import EmbedPlan
from dn2ops.embed.resume import Resume
from dn2ops.embed.stage import EmbedImages
from dn2ops.io import features, sources
from dn2ops.io.progress import LogProgress

COUNTERS = "dn2"


def _count(name: str):
    counter = beam.metrics.Metrics.counter(COUNTERS, name)

    def inc(x):
        counter.inc()
        return x

    return inc


def embed(p: beam.Pipeline, src: str, plan: EmbedPlan, *, reuse: str | None = None,
          workers: int = 1, resume: Resume | None = None, extra_columns: Sequence[str] = ()):
    """Lists SRC and embeds it as ``plan`` says (EmbedImages). Returns (feature rows, error
    rows, count of listed images, count of images whose features were copied from
    ``reuse``, an earlier features directory, the copied rows). ``workers``: the local
    runner's, for the progress log. ``resume``: seal the rows made into pieces, copy the
    adopted ones (pipelines.resume). The copied rows (from ``reuse`` or the adopted
    pieces) are record batches of ``features.feature_schema(extra_columns)``, apart from
    the embedded rows (EmbedImages says why), or None when nothing can be copied.

    The counts (singleton PCollections) are what finalize checks and records.
    """
    rows = p | "List" >> sources.ListImages(src) | "CountIn" >> beam.Map(_count("listed"))
    total = rows | "Total" >> beam.combiners.Count.Globally()
    rows = rows | "Progress" >> beam.ParDo(
        LogProgress("embedding", workers=workers), total=beam.pvalue.AsSingleton(total)
    )
    feats, errors, reused, copied = rows | "Embed" >> EmbedImages(
        plan, reuse=reuse, resume=resume, extra_columns=extra_columns)
    return (feats, errors, total, reused | "Reused" >> beam.combiners.Count.Globally(),
            copied)


def write_features(feats, errors, staging: str, extra_columns: Sequence[str],
                   copied=None) -> list:
    """Writes the shards; returns the PCollections of the file names written (for
    finalize). ``copied``: record batches of copied rows (embed's last output), written
    as shards of their own, ``features-copied-SSSSS-of-NNNNN.parquet``."""
    schema = features.feature_schema(extra_columns)
    written = [
        feats | "WriteFeatures" >> features.WriteTable(staging, "features", schema),
        errors | "WriteErrors" >> features.WriteTable(
            staging, "errors", features.ERROR_SCHEMA, num_shards=1),
    ]
    if copied is not None:
        written.append(copied | "WriteCopied" >> features.WriteBatches(
            staging, "features-copied", schema))
    return written


def embedded_batches(feats, copied, extra_columns: Sequence[str]):
    """Embed's feature rows and copied batches -> one PCollection of record batches."""
    batches = as_batches(feats, extra_columns)
    if copied is None:
        return batches
    return (batches, copied) | "WithCopied" >> beam.Flatten()


def _count_rows(name: str):
    counter = beam.metrics.Metrics.counter(COUNTERS, name)

    def inc(batch):
        counter.inc(batch.num_rows)
        return batch

    return inc


def read_features(p: beam.Pipeline, features_dir: str):
    """(feature record batches, error rows, their count) of a committed features directory.

    The feature shards are read in record batches (features.READ_BATCH_ROWS rows), never
    as one Python object per row: the embeddings stay float32 arrays.
    """
    feats = (
        p
        | "FeatureFiles" >> beam.Create(features.shard_paths(features_dir, "features"))
        | "ReadFeatures" >> features.ReadBatches()
        | "CountFeatures" >> beam.Map(_count_rows("listed"))
    )
    errors = (
        p
        | "ErrorFiles" >> beam.Create(features.shard_paths(features_dir, "errors"))
        | "ReadErrors" >> beam.io.ReadAllFromParquet()
        | "CountErrors" >> beam.Map(_count("listed"))
    )
    counts = ((feats | "FeatureRows" >> beam.Map(lambda b: b.num_rows),
               errors | "ErrorRows" >> beam.Map(lambda _: 1))
              | "AllRows" >> beam.Flatten())
    total = counts | "Total" >> beam.CombineGlobally(sum)
    return feats, errors, total


def as_batches(rows, extra_columns: Sequence[str], batch_size: int = 256):
    """Feature rows (dicts, as dn2 embed's stage yields them) -> feature record batches."""
    schema = features.feature_schema(extra_columns)
    return (rows
            | "BatchRows" >> beam.BatchElements(min_batch_size=1, max_batch_size=batch_size)
            | "AsRecordBatch" >> beam.Map(features.rows_batch, schema))


def score(
    batches,
    errors,
    staging: str,
    *,
    index_dir: str,
    partition: str,
    extra_columns: Sequence[str],
    search: SearchConfig,
    flags: FlagConfig = FlagConfig(),
    explain: dict | None = None,
) -> tuple[list, beam.PCollection]:
    """Scores feature record batches (read_features, as_batches) into ranked and flagged
    anomalies-*.parquet and writes errors-*.parquet; returns (the PCollections of the file
    names written, the partition's decision: a singleton), both for finalize. With
    ``explain`` (dn2ops.score.heatmaps.ExplainTop's keywords) a third item: the explain
    stage's result (a singleton: heatmap rows and summary)."""
    from dn2ops.score.images import ScoreFeatures

    scored = batches | "Score" >> ScoreFeatures(
        index_dir, staging, extra_columns=extra_columns, partition=partition, search=search,
        flags=flags, explain=explain)
    written, decision = scored[:2]
    errors = errors | "Partition" >> beam.Map(
        lambda e: {
            "uri": e["uri"],
            "stage": e["stage"],
            "error": e["error"],
            "partition": partition,
        }
    )
    return [written, errors | "WriteErrors" >> features.WriteTable(
        staging, "errors", RESULT_ERROR_SCHEMA, num_shards=1
    )], decision, *scored[2:]


RESULT_ERROR_SCHEMA = features.ERROR_SCHEMA.append(pa.field("partition", pa.string()))


def score_groups(
    feats,
    errors,
    staging: str,
    group: GroupConfig,
    *,
    images,
    index_dir: str | None,
    partition: str,
    search: SearchConfig = SearchConfig(),
    flags: FlagConfig = FlagConfig(),
) -> tuple[list, beam.PCollection]:
    """Group mode, over feature record batches (read_features, as_batches):
    groups-*.parquet (ranked and flagged sets) and errors-*.parquet (images, incl. the
    members of sets too small to score, stage 'group'). ``images``: how many images come
    (an int, or the listing's count; see ScoreGroups). Returns (the PCollections of the
    file names written, the partition's decision), both for finalize."""
    from dn2ops.score.sets import ScoreGroups

    written, group_errors, decision = feats | "ScoreGroups" >> ScoreGroups(
        group, staging, images=images, index_dir=index_dir, partition=partition,
        search=search, flags=flags)
    errors = (errors, group_errors) | "AllErrors" >> beam.Flatten()
    errors = errors | "Partition" >> beam.Map(
        lambda e: {"uri": e["uri"], "stage": e["stage"], "error": e["error"],
                   "partition": partition}
    )
    return [written, errors | "WriteErrors" >> features.WriteTable(
        staging, "errors", RESULT_ERROR_SCHEMA, num_shards=1
    )], decision


def finalize(p: beam.Pipeline, step, *, count_in, written: Sequence,
             counts: dict | None = None) -> beam.PCollection:
    """The pipeline's last step: ``step(count_in, **counts)`` once, after every write has
    finished.

    ``step`` is a picklable callable (a functools.partial of a pipelines.finalize
    function) that counts, checks and commits the staged files; ``count_in`` a singleton
    PCollection of the inputs listed; ``counts`` more singleton PCollections (counts, the
    scoring stage's decision), passed to ``step`` by name; ``written`` the PCollections of
    file names the WriteTable steps return. Those names are side inputs, so the step runs
    only once every write's FinalizeWrite has renamed its files into place, wherever the
    pipeline runs (this process, Dataflow workers, a template launch). The step reads the
    staged files itself: a FinalizeWrite that Dataflow retries yields only the files it
    renamed.
    """
    side = {f"written_{i}": beam.pvalue.AsList(w) for i, w in enumerate(written)}
    side.update({f"count_{name}": beam.pvalue.AsSingleton(c)
                 for name, c in (counts or {}).items()})
    return (p
            | "FinalizeOnce" >> beam.Create([None])
            | "Finalize" >> beam.Map(_finalize_after, step,
                                     count_in=beam.pvalue.AsSingleton(count_in), **side))


def _finalize_after(_, step, count_in: int, **side):
    return step(count_in, **{k[len("count_"):]: v for k, v in side.items()
                             if k.startswith("count_")})
