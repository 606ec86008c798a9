"""What the dn2 jobs check before any pipeline starts: sources, outputs, backbone,
weights, devices, and an index against the features it will score.

Everything here fails fast with a message for the user; pipelines.jobs runs the graphs.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from typing import TYPE_CHECKING

from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from dn2ops.config import EmbedConfig, FlagConfig, JobConfig
from dn2ops.embed import weights_memo
from dn2ops.embed.backbones import (
    RANDOM_WEIGHTS,
    BackboneSpec,
    WeightsError,
    get_spec,
    resolve_weights,
)
from dn2ops.embed.export import export_dir
from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.base import device_type, resolve_engine, shares_model
from dn2ops.errors import ConfigError
from dn2ops.io import features, outputs, sources

if TYPE_CHECKING:  # imported where used: `dn2 embed` starts without torch, faiss, scipy
    from dn2ops.index import LoadedIndex
    from dn2ops.score import decisions


def preflight(config: EmbedConfig, options: PipelineOptions, *,
              spec: BackboneSpec | None = None) -> EmbedPlan:
    """Fails before any pipeline starts: unknown backbone, missing weights, missing GPU,
    an engine that cannot run here. Returns the plan of ``config`` (dn2ops.embed.plan),
    which every embedding of the job takes whole: a dn2 command checks and plans once.

    The GPU is checked here only when the pipeline runs in this process: a Dataflow job is
    launched from a machine without one, and its workers check ``--device cuda`` themselves.
    So is the export cache of a CPU engine (created private, or refused: CacheDirError).
    The weights are loaded once here, to hash them for the plan (unless their files are
    the ones hashed before: dn2ops.embed.weights_memo). Weights the user names
    are untrusted files, loaded with ``torch.load(weights_only=True)``: a damaged, hostile
    or ill-fitting file fails now with a short reason, not later inside every worker.
    ``spec``: the spec of ``config.backbone``, when the caller has it already.
    """
    spec = spec or get_spec(config.backbone)
    if config.weights != RANDOM_WEIGHTS:
        resolve_weights(spec, config.weights)
    if runs_here(options):
        device_type(config.device)  # a --device cuda without a GPU fails here
        if resolve_engine(config.engine, config.device) != "torch":
            export_dir(config.cache_dir)
    try:
        return EmbedPlan.resolve(config, spec=spec, workers=model_workers(options),
                                 shared=shares_model(config, model_processes(options)),
                                 weights_hash=weights_memo.weights_sha256(spec, config))
    except WeightsError as e:
        if config.weights in (None, RANDOM_WEIGHTS):
            raise
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


def runs_here(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    return runner is None or str(runner).split(".")[-1] in LOCAL_RUNNERS


# Runners that execute the pipeline in (or beside) this process, on this machine's devices.
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner",
                 "SwitchingDirectRunner", "direct")


def local_workers(options: PipelineOptions) -> int:
    """The local runner's workers (threads or processes; --direct_num_workers)."""
    return max(1, options.view_as(DirectOptions).direct_num_workers or 1)


def model_workers(options: PipelineOptions) -> int | None:
    """Model calls that run at once on one machine, which share its cores
    (dn2ops.engines.base.thread_plan): the local runner's workers (threads or processes);
    None for a remote runner, which runs one SDK process per vCPU (Dataflow's default for
    Python), unless told to run one process (no_use_multiple_sdk_containers)."""
    if runs_here(options):
        return local_workers(options)
    experiments = options.view_as(DebugOptions).experiments or []
    return 1 if "no_use_multiple_sdk_containers" in experiments else None


def model_processes(options: PipelineOptions) -> int | None:
    """SDK processes that run the model on one machine: the local runner's workers with
    ``--direct_running_mode multi_processing`` (else 1: threads share a process's model);
    None for a remote runner (one a vCPU), unless told to run one."""
    if runs_here(options):
        direct = options.view_as(DirectOptions)
        return local_workers(options) if direct.direct_running_mode == "multi_processing" else 1
    experiments = options.view_as(DebugOptions).experiments or []
    return 1 if "no_use_multiple_sdk_containers" in experiments else None


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
    others = [n for n in names if n not in RUN_OUTPUTS and not outputs.is_bookkeeping(n)]
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


def is_template(options: PipelineOptions) -> bool:
    """A template launch (--template_location, as the flex template launcher passes): the
    job runs later and nobody waits for it; its last step commits (pipelines.finalize)."""
    return bool(options.view_as(GoogleCloudOptions).template_location)


def extra_columns(src: str) -> list[str]:
    """Manifest columns carried to the outputs (read from the header only)."""
    if not sources.is_manifest(src):
        return []
    first = next(iter(sources.read_manifest(src)), {})
    return [c for c in first if c not in ("uri",) + tuple(features.feature_schema().names)]


@dataclasses.dataclass(frozen=True)
class ScorePlan:
    """What dn2 score's checks found: the index's manifest, the backbone, the manifest
    columns carried, the pool of a set index, and with --input the embedding's plan."""

    manifest: dict | None
    backbone: str
    extras: list
    pool: str | None
    embed: EmbedPlan | None = None


def check_score(index: str | None, output: str, input: str | None, features_dir: str | None,
                 config: JobConfig, options: PipelineOptions) -> ScorePlan:
    """Everything dn2 score can check before the pipeline starts."""
    from dn2ops.index import LoadedIndex
    from dn2ops.index.gpu import resolve_faiss_device
    from dn2ops.score.grouping import check_index_mode, check_key

    if is_template(options) and config.score.report:
        raise ConfigError("--report needs the results, which a template launch does not "
                          "wait for; run dn2 report RESULTS_DIR after the job")
    if not config.covtrace and runs_here(options):  # Dataflow workers check their own GPUs
        resolve_faiss_device(config.search.device)  # a GPU asked for but missing fails here
    # Verifies checksums before heavy work; the workers load their own.
    loaded = None if config.covtrace else LoadedIndex(index, stream_shards=True, device="cpu")
    group = config.group
    pool = group.pool if group else None
    if loaded is not None:
        pool = check_index_mode(loaded.manifest, group.group_by if group else None, pool)
        check_flags(config.score.flags, loaded.reference)
    embed = None
    if features_dir:
        backbone, extras = _check_features(features_dir, loaded)
    else:
        embed, extras = _check_images(input, loaded, config.embed, options)
        backbone = embed.backbone
    if group:
        check_key(group.group_by, extras)
    outputs.check_writable(output, "results")
    return ScorePlan(loaded.manifest if loaded is not None else None,
                      loaded.manifest["backbone"] if loaded is not None else backbone,
                      extras, pool, embed)


def check_flags(flags: FlagConfig, reference: decisions.Reference) -> None:
    """Refuses --alpha below the smallest p-value the index's normal reference can give:
    nothing could ever be flagged. (BH's reach depends on the partition's size: the
    summary warns, dn2ops.score.decisions.resolution_warning.)"""
    from dn2ops.score import decisions

    if flags.rule == "alpha":
        why = decisions.resolution_warning("alpha", flags.level, 1, reference)
        if why:
            raise ConfigError(why)


def _check_features(features_dir: str, loaded: LoadedIndex | None) -> tuple[str, list]:
    fmeta = outputs.require_complete(features_dir, features.KIND)
    if loaded is not None:
        features.check_compatible(loaded.metadata(), fmeta, "the features and the index",
                                  names=("index", "features"))
    check_row_dims(features_dir, fmeta["dim"])
    return fmeta["backbone"], fmeta.get("extra_columns", [])


def _check_images(input: str, loaded: LoadedIndex | None, config: EmbedConfig,
                  options: PipelineOptions) -> tuple[EmbedPlan, list]:
    spec = get_spec(config.backbone)
    if loaded is not None and config.backbone != loaded.manifest["backbone"]:
        features.check_compatible(loaded.metadata(), spec.metadata(),
                                  "--backbone and the index", names=("index", "--backbone"))
    plan = preflight(config, options, spec=spec)
    check_source(input)
    return plan, extra_columns(input)


