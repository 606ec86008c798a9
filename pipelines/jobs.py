"""The dn2 jobs: run a graph into a staging folder, check it, commit it.

Each job takes the dn2ops.config objects built once in pipelines.options. The checks
that can fail (pipelines.checks) run before any heavy work; outputs are committed only
after every write succeeded, by the pipeline's own last step (pipelines.finalize),
so a job launched from a Dataflow template commits too (see dn2ops.io.outputs).
Each job holds its output's lease while it runs (dn2ops.io.lease): a second run into the
same output stops with an error naming the first; in a template job, which no process
waits on, the pipeline's last step takes it.

The index and scoring modules (torch, faiss, scipy: about 3 s of imports on 2 cores) are
imported by the jobs that use them, not here: `dn2 embed`, and so the rerun that resumes
a crashed one, starts without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from dn2ops.config import EmbedConfig, JobConfig
from dn2ops.embed.plan import EmbedPlan
from dn2ops.embed.resume import Resume
from dn2ops.embed.reuse import check_reusable
from dn2ops.errors import ConfigError
from dn2ops.io import features, lease, outputs, pieces
from pipelines import checks, finalize, graphs, resume
from pipelines.finalize import JobError  # noqa: F401  (moved there; callers import it here)

LOG = logging.getLogger("dn2")


def _embed_graph(p: beam.Pipeline, src: str, options: PipelineOptions, plan: EmbedPlan,
                 reuse: str | None = None, resumed: Resume | None = None,
                 extra_columns: Sequence[str] = ()):
    """Lists and embeds SRC on ``p`` as ``plan`` says: (feature rows, error rows, count of
    listed images, count of images copied by ``reuse``, the copied rows: graphs.embed).
    ``resumed``: seal the rows made, copy the adopted pieces' (pipelines.resume)."""
    return graphs.embed(p, src, plan, reuse=reuse, workers=checks.local_workers(options),
                        resume=resumed, extra_columns=extra_columns)


def _run(pipeline: beam.Pipeline, resumed: Resume | None = None) -> bool:
    """Runs the pipeline; True when it ran to the end here (its outputs are committed),
    False for a template launch, which only writes the job graph."""
    result = pipeline.run()
    if checks.is_template(pipeline.options):
        LOG.info("template written to %s; the job commits its outputs as its last step",
                 pipeline.options.view_as(GoogleCloudOptions).template_location)
        return False
    result.wait_until_finish()
    _log_model_loads(result)
    resume.log_resumed(result, resumed)
    return True


def _log_model_loads(result: Any) -> None:
    """Logs the models RunInference loaded in the run, over all its worker processes: the
    count of its load-latency distribution (one entry a load), per handler namespace.
    Beam shares a model between the threads of a process, not between processes: one
    load per worker process is the expected figure (docs/memory.md)."""
    try:
        found = result.metrics().query(MetricsFilter())["distributions"]
    except Exception:  # a runner without metrics: nothing to say
        return
    loads: dict[str, int] = {}
    for d in found:
        if d.key.metric.name.endswith("load_model_latency_milli_secs") and d.committed:
            loads[d.key.metric.namespace] = (loads.get(d.key.metric.namespace, 0)
                                             + d.committed.count)
    names = {"dn2": "embedding", "dn2_score": "index"}
    if loads:
        LOG.info("model loads: %s", ", ".join(f"{names.get(ns, ns)} {n}"
                                              for ns, n in sorted(loads.items())))


def _run_staged(pipeline: beam.Pipeline, staging: str, resumed: Resume | None = None
                ) -> bool:
    """_run, discarding the staging folder when the pipeline fails, but its sealed
    pieces (and its lease, which pipelines.resume releases): a rerun resumes from them."""
    try:
        return _run(pipeline, resumed)
    except BaseException:
        outputs.discard(staging, keep=(pieces.PIECES, lease.LEASE))
        raise


def _leased(output: str, staging: str, options: PipelineOptions):
    """The lease of OUTPUT for the run staging into ``staging``, held while the job's
    pipeline runs here; none for a template launch (its last step takes the lease)."""
    if checks.is_template(options):
        return contextlib.nullcontext()
    return lease.hold(output, finalize.run_id(staging))


def embed(*, input: str, output: str, config: EmbedConfig, reuse: str | None = None,
          options: PipelineOptions, test_pipeline: beam.Pipeline | None = None,
          plan: EmbedPlan | None = None) -> dict:
    """dn2 embed: SRC -> FEATURES_DIR. Returns the features marker, which records the
    engine (resolved), the decode and the weights' sha256 beside the backbone metadata,
    and with ``reuse`` (an earlier FEATURES_DIR) how many images were copied from it.

    ``plan``: the plan that checks.preflight returned for ``config`` already (dn2 run
    checks once for both of its embeddings); None: checked and planned here."""
    started = time.time()
    plan = plan or checks.preflight(config, options)
    checks.check_source(input)
    outputs.check_writable(output, features.KIND)
    if reuse:
        checks.check_source(reuse, "--reuse")
        check_reusable(reuse, plan.metadata(), plan.weights_sha256)
    extras = checks.extra_columns(input)
    key = resume.key(input, plan, options)  # None: nothing sealed (Dataflow, templates)
    staging = outputs.new_staging(output, key)
    with _leased(output, staging, options), resume.adopt(output, staging, key,
                                                         plan) as resumed:
        p = test_pipeline or beam.Pipeline(options=options)
        feats, errors, count_in, reused, copied = _embed_graph(
            p, input, options, plan, reuse=reuse, resumed=resumed, extra_columns=extras)
        written = graphs.write_features(feats, errors, staging, extras, copied)
        # The last step of the pipeline counts, checks and commits (also in a template job).
        graphs.finalize(p, functools.partial(
            finalize.finalize_embedded, plan=plan, staging=staging, output=output,
            input=input, reuse=reuse, extra_columns=extras, started=started),
            count_in=count_in, written=written, counts={"reused": reused})
        if not _run_staged(p, staging, resumed):
            return {}
    marker = outputs.require_complete(output, features.KIND)
    marker.pop("run_id", None)
    marker.pop(outputs.FILES, None)
    LOG.info("embedded %s of %s images into %s (%s errors; engine %s%s)", marker["embedded"],
             marker["count_in"], output, marker["errored"], marker.get("engine"),
             f"; {marker['reused']['images']} copied from {reuse}" if reuse else "")
    return marker


def build(*, features_dir: str, output: str, config: JobConfig) -> dict:
    """dn2 build-index: FEATURES_DIR -> INDEX_DIR (of sets with ``config.group``).
    Returns the manifest."""
    outputs.check_writable(output, "index")  # before the lease is written into it
    with lease.hold(output, lease.new_run_id()):
        return _build(features_dir, output, config)


def _build(features_dir: str, output: str, config: JobConfig) -> dict:
    from dn2ops.index import build_index  # here, not at the top: see the module's docstring
    from dn2ops.score.grouping import build_group_index

    if config.group is not None:
        manifest = build_group_index(features_dir, output, config.index, config.group)
        LOG.info("index %s: %s normal sets (--group-by %s, --pool %s), %s too small",
                 manifest["index_id"], manifest["group_counts"]["sets_indexed"],
                 config.group.group_by, manifest["pool"],
                 manifest["group_counts"]["sets_too_small"])
        return manifest
    manifest = build_index(features_dir, output, config.index, device=config.search.device)
    _log_built(manifest, config.index.k)
    return manifest


def add(*, features_dir: str, index: str, output: str, retrain: bool = False,
        config: JobConfig) -> dict:
    """dn2 build-index --add: INDEX_DIR + FEATURES_DIR -> NEW_INDEX_DIR. Returns the manifest.
    Only ``config``'s reference sample, faiss device and whether to clean the added images
    (the parent's auto rule; --no-clean: not) apply: the rest is the parent's."""
    from dn2ops.index.add import add_to_index  # see the module's docstring
    from dn2ops.index.gpu import resolve_faiss_device

    outputs.check_writable(output, "index")  # before the lease is written into it
    with lease.hold(output, lease.new_run_id()):
        manifest = add_to_index(features_dir, index, output, retrain=retrain,
                                reference_sample=config.index.reference_sample,
                                device=resolve_faiss_device(config.search.device),
                                clean=config.index.clean_rule != "off")
    LOG.info("added %s images to index %s: index %s", manifest["added"]["images"],
             manifest["parent_index_id"], manifest["index_id"])
    _log_built(manifest, manifest["k"])
    return manifest


def _log_built(manifest: dict, k: int) -> None:
    from dn2ops.index import kinds  # see the module's docstring

    kinds.for_manifest(manifest).log_built(manifest, k)  # e.g. an approximate index's recall
    LOG.info(
        "index %s: %s normal images kept of %s, %s shard(s)",
        manifest["index_id"],
        manifest["counts"]["kept"],
        manifest["counts"]["normal_in"],
        manifest["shards"],
    )


def score(*, index: str | None, output: str, input: str | None = None,
          features_dir: str | None = None, source: str | None = None, config: JobConfig,
          options: PipelineOptions, test_pipeline: beam.Pipeline | None = None) -> dict:
    """dn2 score: (SRC | FEATURES_DIR) x INDEX_DIR -> RESULTS_DIR. Returns summary.json.

    With ``config.group`` the images are scored as sets (groups-*.parquet); with its
    method covtrace no index is used. The pipeline's last step writes summary.json and
    the top CSV and commits (pipelines.finalize). A template launch
    (``--template_location``) returns {} once the job graph is written; its job then
    fails when more than ``max_error_fraction`` of the inputs errored (after committing).
    """
    started = time.time()
    plan = checks.check_score(index, output, input, features_dir, config, options)
    key = resume.key(input, plan.embed, options) if input else None  # --input seals
    staging = outputs.new_staging(output, key)
    # held until report.html is written too
    with _leased(output, staging, options), resume.adopt(output, staging, key,
                                                         plan.embed) as resumed:
        pipeline_started = time.time()
        p = test_pipeline or beam.Pipeline(options=options)
        written, count_in, counts = _score_graph(p, plan, index, input, features_dir,
                                                 staging, config, options, resumed)
        # The last step of the pipeline: summary.json, accounting check, top CSV, commit.
        graphs.finalize(p, _finalize_results(plan, index, output,
                                             source or input or features_dir, staging,
                                             (started, pipeline_started), config,
                                             checks.is_template(options)),
                        count_in=count_in, written=written, counts=counts)
        if not _run_staged(p, staging, resumed):
            return {}
        summary = finalize.committed_summary(output)
        LOG.info("scored %s of %s images into %s (%s errors)%s", summary["scored"],
                 summary["count_in"], output, summary["errored"], _flagged(summary))
        if config.score.report:
            from dn2ops.report import write_report

            write_report(output, index_dir=index)
    finalize.check_error_fraction(summary, config.score.max_error_fraction, output)
    return summary


def _flagged(summary: dict) -> str:
    """'; N flagged (rule level)' for the log line, from summary.json's flags."""
    flags = summary.get("flags") or {}
    if flags.get("rule") is None:
        return ""
    return f"; {flags['flagged']} flagged (--{flags['rule']} {flags['level']:g})"


def _score_graph(p: beam.Pipeline, plan: checks.ScorePlan, index: str | None, input: str | None,
                 features_dir: str | None, staging: str, config: JobConfig,
                 options: PipelineOptions, resumed: Resume | None = None):
    """dn2 score's graph on ``p``: (the PCollections of file names written, count_in, the
    singletons finalize takes: the partition's decision, the heatmaps' result)."""
    group = config.group
    if features_dir:
        feats, errors, count_in = graphs.read_features(p, features_dir)
    else:
        feats, errors, count_in, _, copied = _embed_graph(
            p, input, options, plan.embed, resumed=resumed, extra_columns=plan.extras)
        feats = graphs.embedded_batches(feats, copied, plan.extras)
    partition = config.score.partition
    if group:
        # The number of buckets sets are spilled into: from the features' marker, or the
        # listing's count (computed before embedding starts, so nothing waits on it).
        images = outputs.read_marker(features_dir).get("embedded", 0) if features_dir else count_in
        written, decision = graphs.score_groups(
            feats, errors, staging, dataclasses.replace(group, pool=plan.pool), images=images,
            index_dir=index, partition=partition, flags=config.score.flags)
        return written, count_in, {"decision": decision}
    explain = None if config.score.explain == 0 else {
        "backbone": plan.backbone, "weights": config.embed.weights,
        "explain": config.score.explain, "top": config.score.top}
    written, decision, *heatmaps = graphs.score(
        feats, errors, staging, index_dir=index, partition=partition,
        extra_columns=plan.extras, search=config.search, flags=config.score.flags,
        explain=explain)
    counts = {"decision": decision}
    if heatmaps:
        counts["heatmaps"] = heatmaps[0]
    return written, count_in, counts


def _finalize_results(plan: checks.ScorePlan, index: str | None, output: str, source: str,
                      staging: str, times: tuple[float, float], config: JobConfig,
                      template: bool):
    """The pipeline's last step, a picklable partial of finalize.finalize_results."""
    group = config.group
    return functools.partial(
        finalize.finalize_results, staging=staging, output=output,
        partition=config.score.partition, source=source, index_dir=index,
        index_id=plan.manifest["index_id"] if plan.manifest else None,
        backbone=plan.backbone, started=times[0], pipeline_started=times[1],
        top=config.score.top,
        group={"group_by": group.group_by, "method": group.method, "pool": plan.pool}
        if group else None,
        # nobody waits for a template job: it fails itself when too many inputs errored
        max_error_fraction=config.score.max_error_fraction if template else None)


def run(*, normal: str | None, input: str, output: str, config: JobConfig,
        options: PipelineOptions) -> dict:
    """dn2 run: embed normal -> build index -> embed input -> score, under OUT_DIR."""
    if checks.is_template(options):  # each step needs the one before it committed
        raise ConfigError("dn2 run waits between its steps and cannot be launched as a "
                          "template; template-launch dn2 score (README: Run on Dataflow)")
    normal_features = outputs.join(output, "normal_features")
    index_dir = outputs.join(output, "index")
    input_features = outputs.join(output, "features")
    # Everything that can be checked before hours of embedding: sources, outputs, backbone.
    e = config.embed
    plan = checks.preflight(e, options)
    if not config.covtrace:
        checks.check_source(normal, "--normal")
    checks.check_source(input, "--input")
    checks.check_run_output(output)
    # One dn2 run at a time under OUT_DIR (each step also leases its own directory).
    with lease.hold(output, lease.new_run_id()):
        if config.covtrace:  # scores each set by its own spread: no normal set, no index
            if normal:
                LOG.warning("--normal %s is not used by --group-score covtrace", normal)
        else:
            embed(input=normal, output=normal_features, config=e, options=options,
                  plan=plan)
            build(features_dir=normal_features, output=index_dir, config=config)
        embed(input=input, output=input_features, config=e, options=options, plan=plan)
        return score(index=None if config.covtrace else index_dir,
                     output=outputs.join(output, "results"), features_dir=input_features,
                     source=input, config=config, options=options)
