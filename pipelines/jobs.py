"""The dn2 jobs: run a graph into a staging folder, check it, commit it.

Each job takes typed keyword arguments (parsed once in pipelines.options).
Checks that can fail run before any heavy work; outputs are committed only
after every write succeeded, by the pipeline's own last step (pipelines.finalize),
so a job launched from a Dataflow template commits too (see dn2ops.outputs).
"""

from __future__ import annotations

import functools
import logging
import posixpath
import re
import time
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from dn2ops import features, outputs, sources, transforms
from dn2ops.backbones import WeightsError, get_spec, load_backbone, resolve_weights
from dn2ops.embed import resolve_device
from dn2ops.engines import resolve_engine
from dn2ops.export import weights_sha256
from dn2ops.gpu import resolve_faiss_device
from dn2ops.group_scoring import build_group_index, check_index_mode, check_key
from dn2ops.index import LoadedIndex, build_index
from dn2ops.index_add import add_to_index
from dn2ops.reuse import check_reusable
from dn2ops.streams import REFERENCE_SAMPLE
from pipelines import finalize, graphs
from pipelines.finalize import JobError  # noqa: F401  (moved there; callers import it here)

LOG = logging.getLogger("dn2")


def _workers(options: PipelineOptions) -> int:
    return max(1, options.view_as(DirectOptions).direct_num_workers or 1)


def _embed_graph(p: beam.Pipeline, src: str, options: PipelineOptions, **embed_kwargs):
    """Lists and embeds SRC on ``p``: (feature rows, error rows, count of listed images,
    count of images copied by ``reuse``)."""
    return graphs.embed(p, src, workers=_workers(options), embed_kwargs={
        **embed_kwargs, "workers": _model_workers(options)})


def _model_workers(options: PipelineOptions) -> int | None:
    """Model calls that run at once on one machine, which share its cores
    (dn2ops.engines.engine_threads): the local runner's workers (threads or processes);
    None for a remote runner, which runs one SDK process per vCPU (Dataflow's default for
    Python), unless told to run one process (no_use_multiple_sdk_containers)."""
    if _runs_here(options):
        return _workers(options)
    experiments = options.view_as(DebugOptions).experiments or []
    return 1 if "no_use_multiple_sdk_containers" in experiments else None


def _finalize_features(count_in: int, *, engine: str, device: str, decode: str,
                       metadata: dict[str, Any], reuse: str | None = None,
                       reused: int = 0, **kwargs) -> dict[str, Any]:
    """finalize.finalize_features, recording the engine that ``engine`` resolves to where
    the pipeline's last step runs (beside the model: a Dataflow worker, GPU or not), and
    with ``reuse``, the images whose features were copied from it."""
    metadata = {**metadata, "engine": resolve_engine(engine, device), "decode": decode}
    if reuse:
        metadata["reused"] = {"from": reuse, "images": reused}
    return finalize.finalize_features(count_in, metadata=metadata, **kwargs)


def _preflight(backbone: str, weights: str | None, device: str,
               options: PipelineOptions | None = None, engine: str = "auto") -> None:
    """Fails before any pipeline starts: unknown backbone, missing weights, missing GPU,
    an engine that cannot run here.

    The GPU is checked here only when the pipeline runs in this process: a Dataflow job is
    launched from a machine without one, and its workers check ``--device cuda`` themselves.
    Weights the user names are untrusted files: they are loaded once here (with
    ``torch.load(weights_only=True)``), so a damaged, hostile or ill-fitting file fails now
    with a short reason, not later inside every worker.
    """
    spec = get_spec(backbone)
    if weights != "random":
        resolve_weights(spec, weights)
    if options is None or _runs_here(options):
        resolve_device(device)
        resolve_engine(engine, device)
    if weights not in (None, "random"):
        try:
            load_backbone(backbone, weights)
        except WeightsError as e:
            raise WeightsError(_weights_reason(str(e))) from None


def _weights_reason(message: str) -> str:
    """torch's weights_only refusal, cut to what matters to a dn2 user."""
    if "Weights only load failed" not in message:
        if message.startswith("cannot read weights"):  # torch's own words are cryptic here
            return f"{message} (the file is damaged, truncated or not written by torch.save)"
        return message
    head = message.split("Weights only load failed")[0]
    found = re.search(r"Unsupported (global: GLOBAL \S+|operand \d+)", message)
    detail = f" ({found.group(0)})" if found else ""
    return (f"{head}the file holds more than tensors{detail}, and dn2 loads weights with "
            "torch.load(weights_only=True), never running code from a file; save a plain "
            "state dict: torch.save(model.state_dict(), path)")


def _runs_here(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    return runner is None or str(runner).split(".")[-1] in LOCAL_RUNNERS


# Runners that execute the pipeline in (or beside) this process, on this machine's devices.
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner",
                 "SwitchingDirectRunner", "direct")


def check_source(src: str, flag: str = "--input") -> None:
    """Fails before any pipeline starts when SRC (not a glob) names nothing."""
    if any(c in src for c in "*?["):
        return  # a glob that matches nothing is an empty input, not a typo we can name
    fs, path = outputs.fresh_fs_and_path(src)
    if not fs.exists(path):
        raise sources.SourceError(f"{flag} {src} does not exist")


# The directories `dn2 run` writes under OUT_DIR, and the kind each must hold.
RUN_OUTPUTS = {"normal_features": features.KIND, "index": "index", "features": features.KIND,
               "results": "results"}


def check_run_output(output: str) -> None:
    """Refuses an OUT_DIR that holds anything but earlier `dn2 run` output, before any work."""
    fs, path = outputs.fresh_fs_and_path(output)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise outputs.OutputError(f"output path {output} is a file, not a directory")
    marker = outputs.read_marker(output)
    if marker is not None:
        raise outputs.OutputError(
            f"output path {output} holds dn2 {marker.get('kind')} output, not the "
            f"{', '.join(RUN_OUTPUTS)} directories of dn2 run; choose another --output")
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    others = [n for n in names if n not in RUN_OUTPUTS and not n.startswith(".")]
    if others:
        raise outputs.OutputError(
            f"output path {output} is not empty and holds no dn2 run output (found "
            f"{others[0]!r}...); refusing to write into it; choose another --output")
    for name, kind in RUN_OUTPUTS.items():
        outputs.check_writable(outputs.join(output, name), kind)


def check_row_dims(features_dir: str, dim: int) -> None:
    """Fails when the rows of a features directory do not have the dimension its marker says."""
    found = features.row_dims(features_dir) - {dim}
    if found:
        raise features.MetadataMismatch(
            f"feature rows in {features_dir} have dimension {sorted(found)}, but its "
            f"{outputs.MARKER} marker says {dim}: the directory was changed "
            "after dn2 wrote it; embed the images again")


def _is_template(options: PipelineOptions) -> bool:
    """A template launch (--template_location, as the flex template launcher passes): the
    job runs later and nobody waits for it; its last step commits (pipelines.finalize)."""
    return bool(options.view_as(GoogleCloudOptions).template_location)


def _run(pipeline: beam.Pipeline) -> bool:
    """Runs the pipeline; True when it ran to the end here (its outputs are committed),
    False for a template launch, which only writes the job graph."""
    result = pipeline.run()
    if _is_template(pipeline.options):
        LOG.info("template written to %s; the job commits its outputs as its last step",
                 pipeline.options.view_as(GoogleCloudOptions).template_location)
        return False
    result.wait_until_finish()
    return True


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
    engine: str = "auto",
    decode: str = "draft",
    threads: int | None = None,
    decode_threads: int | None = None,
    max_in_flight: int | None = None,
    reuse: str | None = None,
    options: PipelineOptions,
    test_pipeline: beam.Pipeline | None = None,
) -> dict:
    """dn2 embed: SRC -> FEATURES_DIR. Returns the features marker, which records the
    engine (resolved), the decode and the weights' sha256 beside the backbone metadata,
    and with ``reuse`` (an earlier FEATURES_DIR) how many images were copied from it."""
    started = time.time()
    _preflight(backbone, weights, device, options, engine)
    check_source(input)
    outputs.check_writable(output, features.KIND)
    metadata = {**get_spec(backbone).metadata(),
                "weights_sha256": weights_sha256(load_backbone(backbone, weights))}
    if reuse:
        check_source(reuse, "--reuse")
        check_reusable(reuse, metadata, metadata["weights_sha256"])
    extras = extra_columns(input)
    staging = outputs.new_staging(output)
    p = test_pipeline or beam.Pipeline(options=options)
    feats, errors, count_in, reused = _embed_graph(
        p, input, options, backbone=backbone, weights=weights, device=device,
        batch_size=batch_size, max_pixels=max_pixels, engine=engine, decode=decode,
        threads=threads, decode_threads=decode_threads, max_in_flight=max_in_flight,
        reuse=reuse)
    written = graphs.write_features(feats, errors, staging, extras)
    # The last step of the pipeline counts, checks and commits (also in a template job).
    graphs.finalize(p, functools.partial(
        _finalize_features, engine=engine, device=device, decode=decode, staging=staging,
        output=output, metadata=metadata, input=input, reuse=reuse,
        extra_columns=extras, started=started), count_in=count_in, written=written,
        counts={"reused": reused})
    try:
        if not _run(p):
            return {}
    except BaseException:
        outputs.discard(staging)
        raise
    marker = outputs.require_complete(output, features.KIND)
    marker.pop("run_id", None)
    marker.pop(outputs.FILES, None)
    LOG.info("embedded %s of %s images into %s (%s errors; engine %s%s)", marker["embedded"],
             marker["count_in"], output, marker["errored"], marker.get("engine"),
             f"; {marker['reused']['images']} copied from {reuse}" if reuse else "")
    return marker


def build(
    *,
    features_dir: str,
    output: str,
    k: int = 2,
    kmeans: int | None = None,
    clean_fraction: float = 0.0,
    shards: int = 1,
    group_by: str | None = None,
    pool: str | None = None,
    ivf: int | None = None,
    pq: int | None = None,
    nprobe: int | None = None,
    target_recall: float = 0.95,
    ondisk: bool = False,
    hnsw: int | None = None,
    ef_search: int | None = None,
    reference_sample: int | None = REFERENCE_SAMPLE,
    feature_transform: str | None = None,
    clean_k: int | None = None,
    device: str = "auto",
) -> dict:
    """dn2 build-index: FEATURES_DIR -> INDEX_DIR (of sets with group_by). Returns the manifest.

    ``feature_transform`` None: dn2ops.transforms.DEFAULT for an index of images, none for
    an index of sets (their pooled features are not transformed).
    """
    if feature_transform is None:
        feature_transform = "none" if group_by else transforms.DEFAULT
    if group_by and (ivf or hnsw or reference_sample != REFERENCE_SAMPLE
                     or feature_transform != "none" or clean_k is not None):
        raise ValueError("--ivf, --hnsw, --reference-sample, --feature-transform and "
                         "--clean-k are not available with --group-by")
    if not ivf and (pq or nprobe or ondisk):
        raise ValueError("--pq, --nprobe and --ondisk need --ivf NLIST")
    if not hnsw and ef_search:
        raise ValueError("--ef-search needs --hnsw M")
    if group_by:
        manifest = build_group_index(
            features_dir, output, group_by=group_by, pool=pool or "mean", k=k,
            n_centroids=kmeans, clean_fraction=clean_fraction, shards=shards,
        )
        LOG.info("index %s: %s normal sets (--group-by %s, --pool %s), %s too small",
                 manifest["index_id"], manifest["group_counts"]["sets_indexed"], group_by,
                 manifest["pool"], manifest["group_counts"]["sets_too_small"])
        return manifest
    manifest = build_index(
        features_dir, output, k=k, n_centroids=kmeans, clean_fraction=clean_fraction,
        shards=shards, ivf_lists=ivf, pq_m=pq, nprobe=nprobe, target_recall=target_recall,
        ondisk=ondisk, hnsw_m=hnsw, ef_search=ef_search, reference_sample=reference_sample,
        feature_transform=feature_transform, clean_k=clean_k, device=device,
    )
    _log_built(manifest, k)
    return manifest


def add(*, features_dir: str, index: str, output: str, retrain: bool = False,
        reference_sample: int | None = REFERENCE_SAMPLE, device: str = "auto") -> dict:
    """dn2 build-index --add: INDEX_DIR + FEATURES_DIR -> NEW_INDEX_DIR. Returns the manifest."""
    manifest = add_to_index(features_dir, index, output, retrain=retrain,
                            reference_sample=reference_sample,
                            device=resolve_faiss_device(device))
    LOG.info("added %s images to index %s: index %s", manifest["added"]["images"],
             manifest["parent_index_id"], manifest["index_id"])
    _log_built(manifest, manifest["k"])
    return manifest


def _log_built(manifest: dict, k: int) -> None:
    for mode, effort in (("ivf", "nprobe"), ("hnsw", "ef_search")):
        if manifest.get(mode):
            info = manifest[mode]
            recall = info["recall"]
            LOG.info("%s: %s %s, recall@%s %.3f (approximate scores)", mode.upper(), effort,
                     info[effort], k, recall["recall_at_k"])
            if not recall["target_reached"]:
                LOG.warning("%s recall@%s %.3f is below the target %.3f even at %s %s: scores "
                            "are often above the exact ones; use exact shards or another "
                            "index", mode.upper(), k, recall["recall_at_k"], recall["target"],
                            effort, info[effort])
    LOG.info(
        "index %s: %s normal images kept of %s, %s shard(s)",
        manifest["index_id"],
        manifest["counts"]["kept"],
        manifest["counts"]["normal_in"],
        manifest["shards"],
    )


def score(
    *,
    index: str | None = None,
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
    engine: str = "auto",
    decode: str = "draft",
    threads: int | None = None,
    decode_threads: int | None = None,
    max_in_flight: int | None = None,
    group_by: str | None = None,
    pool: str | None = None,
    group_score: str | None = None,
    stream_shards: bool = False,
    options: PipelineOptions,
    test_pipeline: beam.Pipeline | None = None,
) -> dict:
    """dn2 score: (SRC | FEATURES_DIR) x INDEX_DIR -> RESULTS_DIR. Returns summary.json.

    With ``group_by`` the images are scored as sets (groups-*.parquet); with
    ``group_score="covtrace"`` no index is used. The pipeline's last step writes
    summary.json and the top CSV and commits (pipelines.finalize). A template launch
    (``--template_location``) returns {} once the job graph is written; its job then
    fails when more than ``max_error_fraction`` of the inputs errored (after committing).
    """
    started = time.time()
    template = _is_template(options)
    if template and report:
        raise ValueError("--report needs the results, which a template launch does not wait "
                         "for; run dn2 report RESULTS_DIR after the job")
    covtrace = bool(group_by) and group_score == "covtrace"
    if not covtrace and not index:
        raise ValueError("--index is required (only --group-score covtrace scores without one)")
    # Verifies checksums (and a GPU asked for) before heavy work; the workers load their own.
    index_options = {"stream_shards": stream_shards, "device": device}
    if not covtrace and _runs_here(options):  # Dataflow workers check their own GPUs
        resolve_faiss_device(device)  # a GPU asked for but missing fails here
    loaded = None if covtrace else LoadedIndex(index, stream_shards=True, device="cpu")
    if loaded is not None:
        pool = check_index_mode(loaded.manifest, group_by, pool)
    if features_dir:
        fmeta = outputs.require_complete(features_dir, features.KIND)
        if loaded is not None:
            features.check_compatible(loaded.metadata(), fmeta, "the features and the index",
                                      names=("index", "features"))
        check_row_dims(features_dir, fmeta["dim"])
        extras = fmeta.get("extra_columns", [])
        backbone = fmeta["backbone"]
    else:
        if loaded is not None and backbone != loaded.manifest["backbone"]:
            features.check_compatible(
                loaded.metadata(), get_spec(backbone).metadata(), "--backbone and the index",
                names=("index", "--backbone")
            )
        _preflight(backbone, weights, device, options, engine)
        check_source(input)
        extras = extra_columns(input)
    if group_by:
        check_key(group_by, extras)
    outputs.check_writable(output, "results")
    staging = outputs.new_staging(output)
    pipeline_started = time.time()
    p = test_pipeline or beam.Pipeline(options=options)
    if features_dir:
        feats, errors, count_in = graphs.read_features(p, features_dir)
    else:
        feats, errors, count_in, _ = _embed_graph(
            p, input, options, backbone=backbone, weights=weights, device=device,
            batch_size=batch_size, max_pixels=max_pixels, engine=engine, decode=decode,
            threads=threads, decode_threads=decode_threads, max_in_flight=max_in_flight)
    if features_dir and group_by:
        feats = graphs.as_rows(feats)
    elif not features_dir and not group_by:
        feats = graphs.as_batches(feats, extras)
    if group_by:
        written = graphs.score_groups(feats, errors, staging, group_by=group_by,
                                      method=group_score or "knn", pool=pool, index_dir=index,
                                      partition=partition)
    else:
        written = graphs.score(feats, errors, staging, index_dir=index, partition=partition,
                               extra_columns=extras, index_options=index_options)
    # The last step of the pipeline: summary.json, accounting check, top CSV, commit.
    graphs.finalize(p, functools.partial(
        finalize.finalize_results, staging=staging, output=output, partition=partition,
        source=source or input or features_dir, index_dir=index,
        index_id=loaded.index_id if loaded is not None else None,
        backbone=loaded.manifest["backbone"] if loaded is not None else backbone,
        started=started, pipeline_started=pipeline_started, top=top,
        group={"group_by": group_by, "method": group_score or "knn", "pool": pool}
        if group_by else None,
        # nobody waits for a template job: it fails itself when too many inputs errored
        max_error_fraction=max_error_fraction if template else None,
    ), count_in=count_in, written=written)
    try:
        if not _run(p):
            return {}
    except BaseException:
        outputs.discard(staging)
        raise
    summary = finalize.committed_summary(output)
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
    finalize.check_error_fraction(summary, max_error_fraction, output)
    return summary


def run(
    *,
    normal: str | None,
    input: str,
    output: str,
    k: int = 2,
    kmeans: int | None = None,
    clean_fraction: float = 0.0,
    shards: int = 1,
    options: PipelineOptions,
    index_kwargs: dict[str, Any] | None = None,
    **score_kwargs,
) -> dict:
    """dn2 run: embed normal -> build index -> embed input -> score, under OUT_DIR."""
    if _is_template(options):  # each step needs the one before it committed
        raise ValueError("dn2 run waits between its steps and cannot be launched as a "
                         "template; template-launch dn2 score (README: Run on Dataflow)")
    embed_kw = {
        key: score_kwargs[key]
        for key in ("backbone", "weights", "batch_size", "device", "max_pixels", "engine",
                    "decode", "threads", "decode_threads", "max_in_flight")
    }
    normal_features = outputs.join(output, "normal_features")
    index_dir = outputs.join(output, "index")
    input_features = outputs.join(output, "features")
    covtrace = bool(score_kwargs.get("group_by")) and score_kwargs.get("group_score") == "covtrace"
    # Everything that can be checked before hours of embedding: sources, outputs, backbone.
    _preflight(embed_kw["backbone"], embed_kw["weights"], embed_kw["device"], options,
               embed_kw["engine"])
    if not covtrace:
        check_source(normal, "--normal")
    check_source(input, "--input")
    check_run_output(output)
    if covtrace:  # scores each set by its own spread: no normal set, no index
        if normal:
            LOG.warning("--normal %s is not used by --group-score covtrace", normal)
    else:
        embed(input=normal, output=normal_features, options=options, **embed_kw)
        build(
            features_dir=normal_features,
            output=index_dir,
            k=k,
            kmeans=kmeans,
            clean_fraction=clean_fraction,
            shards=shards,
            group_by=score_kwargs.get("group_by"),
            pool=score_kwargs.get("pool"),
            device=embed_kw["device"],
            **(index_kwargs or {}),
        )
    embed(input=input, output=input_features, options=options, **embed_kw)
    keep = {key: v for key, v in score_kwargs.items() if key not in embed_kw}
    return score(
        index=None if covtrace else index_dir,
        output=outputs.join(output, "results"),
        features_dir=input_features,
        source=input,
        options=options,
        max_pixels=embed_kw["max_pixels"],
        **keep,
    )
