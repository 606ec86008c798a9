"""Argument parsing for every dn2 subcommand, in one place.

dn2's own flags are parsed here; everything else is handed to Beam's
PipelineOptions (``--runner``, ``--temp_location``, ``--direct_num_workers``,
the Dataflow flags); dn2 report, which runs no pipeline, takes none. Configuration
flows one way: flags -> typed keyword arguments of the jobs in pipelines.jobs.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
from collections.abc import Sequence

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    S3Options,
    StandardOptions,
)

from dn2ops.config import (
    CPU_ENGINE_BATCH,
    DEFAULT_BACKBONE,
    DEFAULT_FDR,
    DEFAULT_MAX_PIXELS,
    REFERENCE_SAMPLE,
    EmbedConfig,
    FlagConfig,
    GroupConfig,
    IndexConfig,
    JobConfig,
    ScoreConfig,
    SearchConfig,
)
from dn2ops.embed.backbones import REGISTRY, get_spec
from dn2ops.embed.stage import DECODES, DEFAULT_MAX_IN_FLIGHT
from dn2ops.engines.base import DEVICES, ENGINES
from dn2ops.errors import ConfigError
from dn2ops.io import outputs
from dn2ops.transforms import DEFAULT as DEFAULT_TRANSFORM
from dn2ops.transforms import TRANSFORMS

# Beam's DirectRunner first tries to download and start the Prism runner; dn2
# must never reach for the network, so local runs use the FnApiRunner, the
# in-process runner the DirectRunner itself falls back to.
LOCAL_RUNNER = "FnApiRunner"


def _sample_size(value: str) -> int | None:
    """A positive count, or 'all' (None)."""
    return None if value == "all" else _positive(value)


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _clean_fraction(value: str) -> float | str:
    """argparse type: 'auto' or a fraction in [0, 1) (--clean-fraction)."""
    return "auto" if value == "auto" else _fraction(value)


def _fraction(value: str) -> float:
    f = float(value)
    if not 0.0 <= f < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return f


def _level(value: str) -> float:
    """argparse type: a level in (0, 1) (--fdr, --alpha)."""
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value!r}") from None
    if not 0.0 < f < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return f


def _non_negative(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _backbone(value: str) -> str:
    try:
        return get_spec(value).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_embed_args(p: argparse.ArgumentParser, *, index_decides: bool = False) -> None:
    """``index_decides`` (dn2 score): without --backbone, the index's backbone."""
    g = p.add_argument_group("embedding")
    default = (f"the index's backbone, else {DEFAULT_BACKBONE}" if index_decides
               else DEFAULT_BACKBONE)
    g.add_argument("--backbone", default=None if index_decides else DEFAULT_BACKBONE,
                   type=_backbone, metavar="{" + ",".join(sorted(REGISTRY)) + "}[+...]",
                   help=f"feature extractor (default: {default}; offline weights: the most "
                        "accurate measured; efficientnet_lite0 alone is faster, see README); "
                        "EfficientNet-Lites joined with '+' run side by side and their "
                        "features are concatenated")
    g.add_argument("--weights", default=None,
                   help="state dict path or URI (needed for ResNets; 'random' for speed tests)")
    g.add_argument("--batch-size", type=_positive, default=64,
                   help="images a model call gets: read and decoded ahead, handed on together")
    g.add_argument("--engine-batch", type=_positive, default=None, metavar="N",
                   help="images the engine runs at once within a call, which bounds its "
                        f"working memory (default: {CPU_ENGINE_BATCH} on a CPU, the whole "
                        "call on a GPU; docs/memory.md)")
    g.add_argument("--share-model", choices=("auto", "on", "off"), default="auto",
                   help="one model a machine, shared by its SDK processes (auto: on a CPU "
                        "engine with several processes, e.g. --direct_running_mode "
                        "multi_processing or Dataflow's one a vCPU; docs/memory.md)")
    g.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: GPU when present; cuda: fail fast without one")
    g.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS,
                   help="images declaring more pixels are rejected as decompression bombs")
    g.add_argument("--engine", choices=ENGINES, default="auto",
                   help="what runs the backbone: auto (torch on a CUDA GPU, else onnxruntime), "
                        "torch, openvino or onnxruntime; features are interchangeable")
    g.add_argument("--decode", choices=DECODES, default="draft",
                   help="draft (default): decode only the pixels the resize needs (JPEG DCT "
                        "scaling, integer reduction); full: every pixel (dn2's earlier path)")
    g.add_argument("--threads", "--torch-threads", dest="threads", type=_positive,
                   default=None, metavar="N", help="the engine's threads per model call "
                   "(default: every core of a model call's share; see README, Threads)")
    g.add_argument("--decode-threads", type=_positive, default=None, metavar="N",
                   help="images decoded at once per model call (default: its share "
                        "of the cores, as the engine's --threads; see README, Threads)")
    g.add_argument("--reads-in-flight", type=_positive, default=None,
                   metavar="N", help="images read and held encoded at once per worker, "
                   "hiding object-store latency; they wait for --decode-threads to decode "
                   f"(default: {DEFAULT_MAX_IN_FLIGHT}; a batch more rows wait their turn, "
                   "holding nothing, so that reading goes on during inference; 1: one at a "
                   "time)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="dn2's cache of exported models (--engine onnxruntime/openvino) on "
                        "the machines that run the model, created with mode 0700; another "
                        "user's, or one others can write, is refused (default: "
                        "$DN2_CACHE_DIR, else $XDG_CACHE_HOME/dn2, else ~/.cache/dn2)")


def add_index_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("index")
    g.add_argument("--k", type=_positive, default=2, help="neighbours averaged (default 2)")
    g.add_argument("--kmeans", type=_positive, default=None, metavar="C",
                   help="score by distance to the nearest of C K-means centres")
    g.add_argument("--clean-fraction", type=_clean_fraction, default="auto", metavar="auto|F",
                   help="which normal images to remove before indexing (dn2ops.index.cleaning):"
                        " auto (default): those far from the rest by a rule that needs no rate "
                        "(the share removed is recorded as the estimated contamination); F: the "
                        "fraction F with the highest leave-one-out score; 0: none")
    g.add_argument("--no-clean", dest="clean_fraction", action="store_const", const=0.0,
                   help="keep every normal image (as --clean-fraction 0)")
    g.add_argument("--clean-k", type=_positive, default=None, metavar="K",
                   help="neighbours of the cleaning score (default: max(--k, 200); 2 removed "
                        "fewer impurities on Fashion-MNIST, see README)")
    g.add_argument("--feature-transform", choices=TRANSFORMS, default=None,
                   help=f"applied to normal and scored features alike: none (the paper's DN2), "
                        f"l2, sqrt-l2 or root4-l2 (default: {DEFAULT_TRANSFORM}, the most accurate "
                        f"measured, see README; none with --group-by)")
    g.add_argument("--shards", type=_positive, default=1,
                   help="flat index shards; build and --stream-shards scoring hold one at a time")
    g.add_argument("--ivf", type=_positive, default=None, metavar="NLIST",
                   help="approximate IVF index with NLIST lists instead of exact flat shards")
    g.add_argument("--pq", type=_positive, default=None, metavar="M",
                   help="with --ivf: compress vectors with M-byte product quantization")
    g.add_argument("--nprobe", type=_positive, default=None, metavar="P",
                   help="with --ivf: lists searched per query (default: the smallest power of "
                        "2 reaching --target-recall, measured at build time)")
    g.add_argument("--hnsw", type=_positive, default=None, metavar="M",
                   help="approximate HNSW graph index with M neighbours per node (e.g. 32) "
                        "instead of exact flat shards: fastest scoring, held in memory")
    g.add_argument("--ef-search", type=_positive, default=None, metavar="EF",
                   help="with --hnsw: search effort (default: the smallest of 16, 32, 64, ... "
                        "reaching --target-recall, measured at build time)")
    g.add_argument("--target-recall", type=float, default=0.95, metavar="R",
                   help="with --ivf and no --nprobe, or --hnsw and no --ef-search: recall@k "
                        "to reach (default 0.95)")
    g.add_argument("--ondisk", action="store_true",
                   help="with --ivf: inverted lists on disk, memory-mapped (local --output)")
    g.add_argument("--reference-sample", type=_sample_size, default=REFERENCE_SAMPLE,
                   metavar="S|all",
                   help="percentile reference from the leave-one-out scores of S sampled "
                        f"normal images (default {REFERENCE_SAMPLE:,}: every percentile "
                        "within about a point, a build linear in n); 'all' scores every "
                        "image, which costs n^2")


def add_score_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--top", type=_positive, default=None, metavar="N",
                   help="also write top_anomalies.csv with the N most anomalous")
    g.add_argument("--explain", type=_non_negative, default=None, metavar="N",
                   help="heatmaps (results/heatmaps/, heatmap_uri, hot_box) of the N "
                        "top-ranked images; 0: none (default: the --top images, at most "
                        "20, or the flagged ones when more, at most 100)")
    g.add_argument("--partition", default="",
                   help="partition name; replaces {partition} in input and output paths "
                        "(today / yesterday: that UTC date, YYYY-MM-DD)")
    g.add_argument("--max-error-fraction", type=_fraction, default=None, metavar="F",
                   help="exit non-zero when more than this fraction of inputs errored")
    g.add_argument("--bigquery-table", default=None, metavar="PROJECT.DATASET.TABLE",
                   help="after the commit, load the results into this table (errors into "
                        "TABLE_errors, sets into TABLE_sets), replacing the partition's rows; "
                        "needs --partition as a date (README: BigQuery)")
    g.add_argument("--report", action="store_true", help="also write report.html")
    g.add_argument("--stream-shards", action="store_true",
                   help="load flat index shards one at a time per batch (index > memory)")
    rule = g.add_mutually_exclusive_group()
    rule.add_argument("--fdr", type=_level, default=None, metavar="Q",
                      help="flag rows by Benjamini-Hochberg at level Q across the partition: "
                           "among flagged rows at most Q are expected to be normal ones "
                           f"(default {DEFAULT_FDR:g}; 0 < Q < 1)")
    rule.add_argument("--alpha", type=_level, default=None, metavar="A",
                      help="instead flag every row with p-value <= A (each normal row is "
                           "flagged with chance A; 0 < A < 1)")


def add_group_args(p: argparse.ArgumentParser, *, scoring: bool) -> None:
    g = p.add_argument_group("groups (score sets of images, see dn2ops.score.sets)")
    g.add_argument("--group-by", default=None, metavar="KEY",
                   help="group images into sets by 'parent_dir' or a manifest column")
    g.add_argument("--pool", choices=("mean", "max"), default=None,
                   help="a set's feature: mean (default) or max of its images' features")
    if scoring:
        g.add_argument("--group-score", choices=("knn", "covtrace"), default=None,
                       help="knn (default): pooled sets vs an index of normal sets; "
                            "covtrace: trace of the set's feature covariance, no index")


def add_report_args(p: argparse.ArgumentParser) -> None:
    """dn2 report's arguments: it reads a results directory and runs no pipeline."""
    p.description = "Render a dn2 results directory as one self-contained HTML report."
    p.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="output of `dn2 score` (committed: with its _SUCCESS marker)")
    p.add_argument("--output", metavar="PATH",
                   help="where to write (default: RESULTS_DIR/report.html)")
    p.add_argument("--index", metavar="DIR",
                   help="normal index dir; its leave-one-out scores are drawn under the "
                        "partition's (default: summary.json's index_dir when reachable)")
    p.add_argument("--top", type=_non_negative, default=20, metavar="N",
                   help="anomalies shown (default 20)")
    p.add_argument("--sample", type=_non_negative, default=200, metavar="N",
                   help="random other images shown (default 200)")
    p.add_argument("--label-column", default="label", metavar="NAME",
                   help="ground-truth column for the ROC curve (default: label)")


def add_load_bigquery_args(p: argparse.ArgumentParser) -> None:
    """dn2 load-bigquery's arguments: a committed results directory and the table."""
    p.description = ("Load a committed dn2 results directory into BigQuery again (without "
                     "scoring it again), replacing its partition's rows.")
    p.add_argument("results_dir", metavar="RESULTS_DIR",
                   help="output of `dn2 score` (committed: with its _SUCCESS marker); its "
                        "summary.json's partition, a date, is the partition loaded")
    p.add_argument("--bigquery-table", required=True, metavar="PROJECT.DATASET.TABLE",
                   help="the ranked table (errors: TABLE_errors, sets: TABLE_sets)")


def _check_bigquery_table(p: argparse.ArgumentParser, table: str,
                          partition: str | None = None) -> None:
    """Refuses, before any work, a malformed --bigquery-table, or (``partition`` given:
    dn2 score / run) a --partition that is not a date (argparse's exit status 2)."""
    from dn2ops.io import bigquery

    try:
        bigquery.table_ref(table)
        if partition is not None:
            bigquery.partition_date(partition)
    except ConfigError as e:
        p.error(str(e))


def parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"dn2 {command}")
    if command == "embed":
        p.add_argument("--input", required=True, help="directory, glob or manifest (csv/parquet)")
        p.add_argument("--output", required=True, help="FEATURES_DIR")
        p.add_argument("--reuse", default=None, metavar="FEATURES_DIR",
                       help="an earlier FEATURES_DIR (same backbone, preprocessing and "
                            "weights): images whose sha256 it holds are copied, not embedded")
        add_embed_args(p)
    elif command == "build-index":
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--features", help="FEATURES_DIR of the normal set")
        src.add_argument("--add", metavar="FEATURES_DIR",
                         help="new normal images to append to --index (dn2ops.index.add)")
        p.add_argument("--index", help="with --add: the committed INDEX_DIR to grow (left "
                                       "as it is)")
        p.add_argument("--retrain", action="store_true",
                       help="with --add to a K-means index: train new centres on the union")
        p.add_argument("--output", required=True, help="INDEX_DIR")
        p.add_argument("--device", choices=DEVICES, default="auto",
                       help="faiss searches: auto (GPU when faiss sees one), cpu, cuda")
        add_index_args(p)
        add_group_args(p, scoring=False)
    elif command == "score":
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--input", help="images to score: directory, glob or manifest")
        src.add_argument("--features", help="FEATURES_DIR of already embedded images")
        p.add_argument("--index", help="INDEX_DIR (not needed with --group-score covtrace)")
        p.add_argument("--output", required=True, help="RESULTS_DIR")
        add_embed_args(p, index_decides=True)
        add_score_args(p)
        add_group_args(p, scoring=True)
    elif command == "run":
        p.add_argument("--normal", help="the normal images: dir, glob or manifest "
                                        "(not needed with --group-score covtrace)")
        p.add_argument("--input", required=True, help="images to score")
        p.add_argument("--output", required=True,
                       help="OUT_DIR: gets normal_features, index, features, results")
        add_embed_args(p)
        add_index_args(p)
        add_score_args(p)
        add_group_args(p, scoring=True)
    elif command == "report":
        add_report_args(p)
    elif command == "load-bigquery":
        add_load_bigquery_args(p)
    else:
        raise ValueError(f"unknown command {command}")
    return p


def parse(command: str, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(dn2 arguments, the remaining Beam arguments). Bad arguments exit with code 2.

    dn2 report runs no pipeline: it takes no Beam arguments and refuses unknown flags.
    """
    p = parser(command)
    if command == "report":
        return p.parse_args(argv), []
    if command == "load-bigquery":
        args = p.parse_args(argv)
        _check_bigquery_table(p, args.bigquery_table)
        return args, []
    args, beam_args = p.parse_known_args(_dashed(p, argv))
    partition = resolve_partition(getattr(args, "partition", ""))
    if hasattr(args, "partition"):
        args.partition = partition
    for name in ("input", "output", "normal", "features", "index"):
        value = getattr(args, name, None)
        if value and "{partition}" in value:
            if not partition:
                p.error(f"--{name} contains {{partition}} but no --partition was given")
            setattr(args, name, value.replace("{partition}", partition))
    if getattr(args, "bigquery_table", None):
        _check_bigquery_table(p, args.bigquery_table, partition)
    unknown = [a for a in beam_args if a.startswith("--") and not _is_beam_flag(a)]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    _check_group_args(p, command, args)
    if command == "score" and args.backbone is None:
        args.backbone = index_backbone(args.index) or DEFAULT_BACKBONE
    if command == "build-index":
        _check_add_args(p, args)
    try:
        args.config = job_config(args)
    except ConfigError as e:
        p.error(str(e))
    return args, beam_args


def job_config(args: argparse.Namespace) -> JobConfig:
    """The one JobConfig of parsed arguments (the flags a command lacks keep defaults).
    Raises ConfigError on a combination no job can run."""
    get = functools.partial(getattr, args)
    group = (GroupConfig(group_by=args.group_by, pool=args.pool,
                         method=get("group_score", None) or "knn")
             if get("group_by", None) else None)
    transform = get("feature_transform", None) or ("none" if group else DEFAULT_TRANSFORM)
    return JobConfig(
        embed=EmbedConfig(
            backbone=get("backbone", DEFAULT_BACKBONE), weights=get("weights", None),
            batch_size=get("batch_size", 64), device=get("device", "auto"),
            max_pixels=get("max_pixels", DEFAULT_MAX_PIXELS), engine=get("engine", "auto"),
            decode=get("decode", "draft"), threads=get("threads", None),
            decode_threads=get("decode_threads", None),
            max_in_flight=get("reads_in_flight", None), cache_dir=get("cache_dir", None),
            engine_batch=get("engine_batch", None), share_model=get("share_model", "auto")),
        index=IndexConfig(
            k=get("k", 2), n_centroids=get("kmeans", None),
            clean_fraction=get("clean_fraction", 0.0), clean_k=get("clean_k", None),
            shards=get("shards", 1), ivf_lists=get("ivf", None), pq_m=get("pq", None),
            nprobe=get("nprobe", None), target_recall=get("target_recall", 0.95),
            ondisk=get("ondisk", False), hnsw_m=get("hnsw", None),
            ef_search=get("ef_search", None),
            reference_sample=get("reference_sample", REFERENCE_SAMPLE),
            feature_transform=transform),
        score=ScoreConfig(partition=get("partition", ""), top=get("top", None),
                          max_error_fraction=get("max_error_fraction", None),
                          report=get("report", False), flags=_flag_config(args),
                          explain=get("explain", None)),
        search=SearchConfig(stream_shards=get("stream_shards", False),
                            device=get("device", "auto")),
        group=group)


def _flag_config(args: argparse.Namespace) -> FlagConfig:
    """--alpha A, else --fdr Q (default DEFAULT_FDR)."""
    alpha, fdr = getattr(args, "alpha", None), getattr(args, "fdr", None)
    if alpha is not None:
        return FlagConfig(rule="alpha", level=alpha)
    return FlagConfig(rule="fdr", level=DEFAULT_FDR if fdr is None else fdr)


def index_backbone(index: str | None) -> str | None:
    """The backbone an INDEX_DIR's manifest records, or None when there is no readable one
    (dn2 score then reports the index itself, before any work)."""
    if not index:
        return None
    try:
        return (outputs.read_marker(index) or {}).get("backbone")
    except Exception:  # noqa: BLE001 - any unreadable index is reported by dn2 score's checks
        return None


def resolve_partition(value: str, today: datetime.date | None = None) -> str:
    """``today`` / ``yesterday`` -> that UTC date as YYYY-MM-DD; other names unchanged.

    A nightly scheduler (Cloud Scheduler's fixed body, a systemd timer) cannot compute a
    date itself, so it passes ``--partition yesterday`` and the job resolves it at launch.
    """
    if value not in ("today", "yesterday"):
        return value
    day = today or datetime.datetime.now(datetime.timezone.utc).date()
    return (day - datetime.timedelta(days=value == "yesterday")).isoformat()


def _dashed(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str] | None:
    """``--batch_size=8`` -> ``--batch-size=8`` for dn2's own flags.

    Dataflow template parameters are named with underscores (deploy/metadata.json) and are
    passed as ``--name=value``; Beam's own flags (``--temp_location``) are left as they are.
    """
    if argv is None:
        return None
    ours = {s for action in p._actions for s in action.option_strings}
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        dashed = name[:2] + name[2:].replace("_", "-")
        if name.startswith("--") and name not in ours and dashed in ours:
            out[i] = dashed + eq + value
    return out


def _check_group_args(p: argparse.ArgumentParser, command: str, args: argparse.Namespace
                      ) -> None:
    group_by = getattr(args, "group_by", None)
    covtrace = getattr(args, "group_score", None) == "covtrace"
    for flag in ("pool", "group_score"):
        if getattr(args, flag, None) and not group_by:
            p.error(f"--{flag.replace('_', '-')} needs --group-by KEY")
    if covtrace and (getattr(args, "fdr", None) or getattr(args, "alpha", None)):
        p.error("--fdr and --alpha flag by p-values against normal sets, which --group-score "
                "covtrace does not have")
    if command == "score" and args.index and covtrace:
        p.error("--index is not used by --group-score covtrace; drop it or use knn")
    if command == "score" and not args.index and not covtrace:
        p.error("--index is required (only --group-by KEY --group-score covtrace scores "
                "without one)")
    if command == "run" and not args.normal and not covtrace:
        p.error("--normal is required (only --group-by KEY --group-score covtrace scores "
                "without normal images)")


# What an index built with --add takes from its parent (the flags that shape an index).
_PARENT_SHAPES = ("k", "kmeans", "clean_k", "feature_transform", "shards",
                  "ivf", "pq", "nprobe", "hnsw", "ef_search", "ondisk", "target_recall",
                  "group_by", "pool")


def _check_add_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.add:
        if args.index or args.retrain:
            p.error("--index and --retrain go with --add FEATURES_DIR")
        return
    if not args.index:
        p.error("--add needs --index INDEX_DIR (the index to grow)")
    shaped = [name for name in _PARENT_SHAPES if getattr(args, name) != p.get_default(name)]
    if shaped:
        flags = ", ".join("--" + n.replace("_", "-") for n in shaped)
        p.error(f"--add keeps the parent index's {flags}; drop them (or build anew)")
    if args.clean_fraction not in ("auto", 0.0):
        p.error(f"--add cleans the added images by the parent's auto rule (the default; "
                f"dn2ops.index.add) or not at all (--no-clean); --clean-fraction "
                f"{args.clean_fraction} would remove a share of the whole set: build anew")


def _is_beam_flag(arg: str) -> bool:
    name = arg[2:].split("=", 1)[0]
    known = PipelineOptions([]).get_all_options(retain_unknown_options=False)
    return name in known or name.replace("-", "_") in known


def check_s3_endpoint(options: PipelineOptions) -> None:
    """Refuses an S3 endpoint that only Beam would use.

    Beam's S3 filesystem (the Parquet writes) takes ``--s3_endpoint_url``; dn2's own
    reads and commits go through s3fs, which takes ``AWS_ENDPOINT_URL`` (botocore's
    variable, which Beam's boto3 client honours too). Set that one variable.
    """
    flag = options.view_as(S3Options).s3_endpoint_url
    env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if flag and flag != env:
        raise ConfigError(
            f"--s3_endpoint_url {flag} would reach only Beam's S3 writes; dn2 lists, reads "
            "and commits s3:// through s3fs, which takes its endpoint from the environment: "
            f"export AWS_ENDPOINT_URL={flag} (Beam's S3 filesystem reads it too) and drop "
            "--s3_endpoint_url")


def beam_options(beam_args: Sequence[str]) -> PipelineOptions:
    """PipelineOptions with a local runner that never downloads anything by default."""
    options = PipelineOptions(list(beam_args))
    check_s3_endpoint(options)
    std = options.view_as(StandardOptions)
    if std.runner in (None, "DirectRunner", "direct"):
        std.runner = LOCAL_RUNNER
    direct = options.view_as(DirectOptions)
    if direct.direct_num_workers == 0:  # Beam's "as many as cores"
        direct.direct_num_workers = os.cpu_count() or 1
    if direct.direct_num_workers > 1 and "--direct_running_mode" not in " ".join(beam_args):
        direct.direct_running_mode = "multi_threading"
    return options
