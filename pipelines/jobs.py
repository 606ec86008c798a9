"""The dn2 jobs: run a graph into a staging folder, check it, commit it.

Each job takes typed keyword arguments (parsed once in pipelines.options).
Checks that can fail run before any heavy work; outputs are committed only
after the pipeline succeeded (see dn2ops.outputs).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import time
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from dn2ops import features, outputs, sources
from dn2ops.backbones import get_spec, resolve_weights
from dn2ops.embed import resolve_device
from dn2ops.index import LoadedIndex, build_index
from pipelines import graphs

LOG = logging.getLogger("dn2")


class JobError(RuntimeError):
    """A run finished but its outcome is not acceptable (e.g. too many errors)."""


def _utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _workers(options: PipelineOptions) -> int:
    return max(1, options.view_as(DirectOptions).direct_num_workers or 1)


def _preflight(backbone: str, weights: str | None, device: str) -> None:
    """Fails before any pipeline starts: unknown backbone, missing weights, missing GPU."""
    spec = get_spec(backbone)
    if weights != "random":
        resolve_weights(spec, weights)
    resolve_device(device)


def _run(pipeline: beam.Pipeline) -> beam.runners.runner.PipelineResult:
    result = pipeline.run()
    result.wait_until_finish()
    return result


def _counter(result, name: str) -> int | None:
    try:
        counters = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    except Exception:  # some runners do not report metrics
        return None
    return int(sum(c.committed or c.attempted or 0 for c in counters)) if counters else 0


def _rows(directory: str, prefix: str) -> int:
    fs, _ = outputs.fs_and_path(directory)
    total = 0
    for p in features.shard_paths(directory, prefix):
        with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def extra_columns(src: str) -> list[str]:
    """Manifest columns carried to the outputs (read from the header only)."""
    if not sources._is_manifest(src):
        return []
    first = next(iter(sources.read_manifest(src)), {})
    return [c for c in first if c not in ("uri",) + tuple(features.feature_schema().names)]


def embed(
    *,
    input: str,
    output: str,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    max_pixels: int,
    torch_threads: int | None = None,
    options: PipelineOptions,
    test_pipeline: beam.Pipeline | None = None,
) -> dict:
    """dn2 embed: SRC -> FEATURES_DIR. Returns the features marker."""
    started = time.perf_counter()
    _preflight(backbone, weights, device)
    outputs.check_writable(output, features.KIND)
    extras = extra_columns(input)
    staging = outputs.new_staging(output)
    p = test_pipeline or beam.Pipeline(options=options)
    feats, errors = graphs.embed(
        p,
        input,
        workers=_workers(options),
        embed_kwargs=dict(
            backbone=backbone,
            weights=weights,
            device=device,
            batch_size=batch_size,
            max_pixels=max_pixels,
            torch_threads=torch_threads,
        ),
    )
    graphs.write_features(feats, errors, staging, extras)
    try:
        result = _run(p)
        marker = {
            "kind": features.KIND,
            **get_spec(backbone).metadata(),
            "input": input,
            "count_in": _counter(result, "listed"),
            "embedded": _rows(staging, "features"),
            "errored": _rows(staging, "errors"),
            "extra_columns": extras,
            "created_at": _utcnow(),
            "seconds": round(time.perf_counter() - started, 2),
        }
        _check_accounted(marker["count_in"], marker["embedded"], marker["errored"], staging)
    except BaseException:
        outputs.discard(staging)
        raise
    outputs.commit(staging, output, marker)
    LOG.info(
        "embedded %s of %s images into %s (%s errors)",
        marker["embedded"],
        marker["count_in"],
        output,
        marker["errored"],
    )
    return marker


def _check_accounted(count_in: int | None, done: int, errored: int, where: str) -> None:
    if count_in is not None and count_in != done + errored:
        raise JobError(
            f"{count_in} inputs but {done} results + {errored} errors in {where}: "
            "images were lost; this is a dn2 bug, please report it"
        )


def build(
    *,
    features_dir: str,
    output: str,
    k: int = 2,
    kmeans: int | None = None,
    clean_fraction: float = 0.0,
    shards: int = 1,
) -> dict:
    """dn2 build-index: FEATURES_DIR -> INDEX_DIR. Returns the manifest."""
    manifest = build_index(
        features_dir, output, k=k, n_centroids=kmeans, clean_fraction=clean_fraction, shards=shards
    )
    LOG.info(
        "index %s: %s normal images kept of %s, %s shard(s)",
        manifest["index_id"],
        manifest["counts"]["kept"],
        manifest["counts"]["normal_in"],
        manifest["shards"],
    )
    return manifest


def score(
    *,
    index: str,
    output: str,
    input: str | None = None,
    features_dir: str | None = None,
    partition: str = "",
    top: int | None = None,
    max_error_fraction: float | None = None,
    report: bool = False,
    source: str | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    max_pixels: int,
    torch_threads: int | None = None,
    options: PipelineOptions,
    test_pipeline: beam.Pipeline | None = None,
) -> dict:
    """dn2 score: (SRC | FEATURES_DIR) x INDEX_DIR -> RESULTS_DIR. Returns summary.json."""
    started = time.perf_counter()
    loaded = LoadedIndex(index)  # verifies checksums before any heavy work
    if features_dir:
        fmeta = outputs.require_complete(features_dir, features.KIND)
        features.check_compatible(loaded.metadata(), fmeta, "the features and the index")
        extras = fmeta.get("extra_columns", [])
    else:
        if backbone != loaded.manifest["backbone"]:
            features.check_compatible(
                loaded.metadata(), get_spec(backbone).metadata(), "--backbone and the index"
            )
        _preflight(backbone, weights, device)
        extras = extra_columns(input)
    outputs.check_writable(output, "results")
    staging = outputs.new_staging(output)
    p = test_pipeline or beam.Pipeline(options=options)
    if features_dir:
        feats, errors = graphs.read_features(p, features_dir)
    else:
        feats, errors = graphs.embed(
            p,
            input,
            workers=_workers(options),
            embed_kwargs=dict(
                backbone=backbone,
                weights=weights,
                device=device,
                batch_size=batch_size,
                max_pixels=max_pixels,
                torch_threads=torch_threads,
            ),
        )
    graphs.score(feats, errors, staging, index_dir=index, partition=partition, extra_columns=extras)
    try:
        t0 = time.perf_counter()
        result = _run(p)
        summary = _summary(
            result,
            staging,
            loaded,
            index=index,
            partition=partition,
            source=source or input or features_dir,
            pipeline_s=time.perf_counter() - t0,
            total_s=time.perf_counter() - started,
        )
        _check_accounted(summary["count_in"], summary["scored"], summary["errored"], staging)
        fs, stage_path = outputs.fs_and_path(staging)
        if top:
            fs.pipe_file(outputs.join(stage_path, "top_anomalies.csv"), _top_csv(staging, top))
        fs.pipe_file(
            outputs.join(stage_path, "summary.json"), json.dumps(summary, indent=2).encode()
        )
    except BaseException:
        outputs.discard(staging)
        raise
    outputs.commit(staging, output, {"kind": "results", **summary})
    LOG.info(
        "scored %s of %s images into %s (%s errors)",
        summary["scored"],
        summary["count_in"],
        output,
        summary["errored"],
    )
    if report:
        from dn2ops.report import write_report

        write_report(output, index_dir=index)
    _check_error_fraction(summary, max_error_fraction, output)
    return summary


def _summary(
    result,
    staging: str,
    loaded: LoadedIndex,
    *,
    index: str,
    partition: str,
    source: str,
    pipeline_s: float,
    total_s: float,
) -> dict[str, Any]:
    errors = features.read_table(staging, "errors", columns=["stage"])
    by_stage: dict[str, int] = {}
    for stage in errors.column("stage").to_pylist() if errors is not None else []:
        by_stage[stage] = by_stage.get(stage, 0) + 1
    return {
        "count_in": _counter(result, "listed"),
        "scored": _rows(staging, "anomalies"),
        "errored": _rows(staging, "errors"),
        "errors_by_stage": by_stage,
        "partition": partition,
        "backbone": loaded.manifest["backbone"],
        "index_id": loaded.index_id,
        "index_dir": index,
        "input": source,
        "timings": {"pipeline_s": round(pipeline_s, 2), "total_s": round(total_s, 2)},
        "created_at": _utcnow(),
    }


def _top_csv(results_dir: str, n: int) -> bytes:
    table = features.read_table(
        results_dir, "anomalies", columns=["rank", "score", "percentile", "uri", "neighbor_uris"]
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "score", "percentile", "uri", "neighbor_uris"])
    if table is not None:
        for r in sorted(table.to_pylist(), key=lambda r: (r["rank"], r["uri"]))[:n]:
            w.writerow(
                [
                    r["rank"],
                    f"{r['score']:.6f}",
                    f"{r['percentile']:.2f}",
                    r["uri"],
                    " ".join(r["neighbor_uris"]),
                ]
            )
    return buf.getvalue().encode()


def _check_error_fraction(summary: dict, limit: float | None, output: str) -> None:
    if limit is None or not summary["count_in"]:
        return
    fraction = summary["errored"] / summary["count_in"]
    if fraction > limit:
        raise JobError(
            f"{summary['errored']} of {summary['count_in']} inputs errored "
            f"({fraction:.1%} > --max-error-fraction {limit:.1%}); "
            f"see {outputs.join(output, 'errors-*.parquet')}"
        )


def run(
    *,
    normal: str,
    input: str,
    output: str,
    k: int = 2,
    kmeans: int | None = None,
    clean_fraction: float = 0.0,
    shards: int = 1,
    options: PipelineOptions,
    **score_kwargs,
) -> dict:
    """dn2 run: embed normal -> build index -> embed input -> score, under OUT_DIR."""
    embed_kw = {
        key: score_kwargs[key]
        for key in ("backbone", "weights", "batch_size", "device", "max_pixels", "torch_threads")
    }
    normal_features = outputs.join(output, "normal_features")
    index_dir = outputs.join(output, "index")
    input_features = outputs.join(output, "features")
    embed(input=normal, output=normal_features, options=options, **embed_kw)
    build(
        features_dir=normal_features,
        output=index_dir,
        k=k,
        kmeans=kmeans,
        clean_fraction=clean_fraction,
        shards=shards,
    )
    embed(input=input, output=input_features, options=options, **embed_kw)
    keep = {key: v for key, v in score_kwargs.items() if key not in embed_kw}
    return score(
        index=index_dir,
        output=outputs.join(output, "results"),
        features_dir=input_features,
        source=input,
        options=options,
        max_pixels=embed_kw["max_pixels"],
        **keep,
    )
