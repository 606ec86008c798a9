"""Builds dn2's Beam graphs on a given pipeline, without running them."""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam

from dn2ops import features, sources
from dn2ops.group_scoring import ScoreGroups, group_schema
from dn2ops.inference import EmbedImages
from dn2ops.progress import LogProgress
from dn2ops.scoring import ScoreFeatures, anomaly_schema

COUNTERS = "dn2"


def _count(name: str):
    counter = beam.metrics.Metrics.counter(COUNTERS, name)

    def inc(x):
        counter.inc()
        return x

    return inc


def embed(p: beam.Pipeline, src: str, *, embed_kwargs: dict, workers: int = 1):
    """Lists SRC and embeds it. Returns (feature rows, error rows, extra manifest columns)."""
    rows = p | "List" >> sources.ListImages(src) | "CountIn" >> beam.Map(_count("listed"))
    total = rows | "Total" >> beam.combiners.Count.Globally()
    rows = rows | "Progress" >> beam.ParDo(
        LogProgress("embedding", workers=workers), total=beam.pvalue.AsSingleton(total)
    )
    feats, errors = rows | "Embed" >> EmbedImages(**embed_kwargs)
    return feats, errors


def write_features(feats, errors, staging: str, extra_columns: Sequence[str]) -> None:
    feats | "WriteFeatures" >> features.WriteTable(
        staging, "features", features.feature_schema(extra_columns)
    )
    errors | "WriteErrors" >> features.WriteTable(
        staging, "errors", features.ERROR_SCHEMA, num_shards=1
    )


def read_features(p: beam.Pipeline, features_dir: str):
    """Feature rows and error rows of a committed features directory."""
    pattern = features.shard_paths(features_dir, "features")
    errs = features.shard_paths(features_dir, "errors")
    feats = (
        p
        | "FeatureFiles" >> beam.Create(pattern)
        | "ReadFeatures" >> beam.io.ReadAllFromParquet()
        | "CountFeatures" >> beam.Map(_count("listed"))
    )
    errors = (
        p
        | "ErrorFiles" >> beam.Create(errs)
        | "ReadErrors" >> beam.io.ReadAllFromParquet()
        | "CountErrors" >> beam.Map(_count("listed"))
    )
    return feats, errors


def score(
    feats,
    errors,
    staging: str,
    *,
    index_dir: str,
    partition: str,
    extra_columns: Sequence[str],
    faiss_threads: int = 1,
    index_options: dict | None = None,
) -> None:
    ranked = feats | "Score" >> ScoreFeatures(
        index_dir, partition=partition, faiss_threads=faiss_threads, index_options=index_options
    )
    ranked | "WriteAnomalies" >> features.WriteTable(
        staging, "anomalies", anomaly_schema(extra_columns)
    )
    errors = errors | "Partition" >> beam.Map(
        lambda e: {
            "uri": e["uri"],
            "stage": e["stage"],
            "error": e["error"],
            "partition": partition,
        }
    )
    errors | "WriteErrors" >> features.WriteTable(
        staging, "errors", RESULT_ERROR_SCHEMA, num_shards=1
    )


RESULT_ERROR_SCHEMA = features.ERROR_SCHEMA.append(
    features.pa.field("partition", features.pa.string())
)


def score_groups(
    feats,
    errors,
    staging: str,
    *,
    group_by: str,
    method: str,
    pool: str | None,
    index_dir: str | None,
    partition: str,
    faiss_threads: int = 1,
) -> None:
    """Group mode: groups-*.parquet (ranked sets) and errors-*.parquet (images, incl. the
    members of sets too small to score, stage 'group')."""
    ranked, group_errors = feats | "ScoreGroups" >> ScoreGroups(
        group_by, method=method, pool=pool, index_dir=index_dir, partition=partition,
        faiss_threads=faiss_threads,
    )
    ranked | "WriteGroups" >> features.WriteTable(staging, "groups", group_schema())
    errors = (errors, group_errors) | "AllErrors" >> beam.Flatten()
    errors = errors | "Partition" >> beam.Map(
        lambda e: {"uri": e["uri"], "stage": e["stage"], "error": e["error"],
                   "partition": partition}
    )
    errors | "WriteErrors" >> features.WriteTable(
        staging, "errors", RESULT_ERROR_SCHEMA, num_shards=1
    )
