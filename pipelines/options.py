"""Argument parsing for every dn2 subcommand, in one place.

dn2's own flags are parsed here; everything else is handed to Beam's
PipelineOptions (``--runner``, ``--temp_location``, ``--direct_num_workers``,
the Dataflow flags). Configuration flows one way: flags -> typed keyword
arguments of the jobs in pipelines.jobs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

from dn2ops.backbones import REGISTRY
from dn2ops.embed import DEVICES
from dn2ops.images import DEFAULT_MAX_PIXELS

# Beam's DirectRunner first tries to download and start the Prism runner; dn2
# must never reach for the network, so local runs use the FnApiRunner, the
# in-process runner the DirectRunner itself falls back to.
LOCAL_RUNNER = "FnApiRunner"


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _fraction(value: str) -> float:
    f = float(value)
    if not 0.0 <= f < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return f


def add_embed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embedding")
    g.add_argument("--backbone", default="efficientnet_lite0", choices=sorted(REGISTRY),
                   help="feature extractor (default: efficientnet_lite0, offline weights)")
    g.add_argument("--weights", default=None,
                   help="state dict path or URI (needed for ResNets; 'random' for speed tests)")
    g.add_argument("--batch-size", type=_positive, default=64)
    g.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: GPU when present; cuda: fail fast without one")
    g.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS,
                   help="images declaring more pixels are rejected as decompression bombs")
    g.add_argument("--torch-threads", type=_positive, default=None,
                   help="torch intra-op threads per worker process")


def add_index_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("index")
    g.add_argument("--k", type=_positive, default=2, help="neighbours averaged (default 2)")
    g.add_argument("--kmeans", type=_positive, default=None, metavar="C",
                   help="score by distance to the nearest of C K-means centres")
    g.add_argument("--clean-fraction", type=_fraction, default=0.0, metavar="F",
                   help="drop this fraction of normal images with the highest own kNN score")
    g.add_argument("--shards", type=_positive, default=1)


def add_score_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring")
    g.add_argument("--top", type=_positive, default=None, metavar="N",
                   help="also write top_anomalies.csv with the N most anomalous")
    g.add_argument("--partition", default="",
                   help="partition name; replaces {partition} in input and output paths")
    g.add_argument("--max-error-fraction", type=_fraction, default=None, metavar="F",
                   help="exit non-zero when more than this fraction of inputs errored")
    g.add_argument("--report", action="store_true", help="also write report.html")


def parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"dn2 {command}")
    if command == "embed":
        p.add_argument("--input", required=True, help="directory, glob or manifest (csv/parquet)")
        p.add_argument("--output", required=True, help="FEATURES_DIR")
        add_embed_args(p)
    elif command == "build-index":
        p.add_argument("--features", required=True, help="FEATURES_DIR of the normal set")
        p.add_argument("--output", required=True, help="INDEX_DIR")
        add_index_args(p)
    elif command == "score":
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--input", help="images to score: directory, glob or manifest")
        src.add_argument("--features", help="FEATURES_DIR of already embedded images")
        p.add_argument("--index", required=True, help="INDEX_DIR")
        p.add_argument("--output", required=True, help="RESULTS_DIR")
        add_embed_args(p)
        add_score_args(p)
    elif command == "run":
        p.add_argument("--normal", required=True, help="the normal images: dir, glob or manifest")
        p.add_argument("--input", required=True, help="images to score")
        p.add_argument("--output", required=True,
                       help="OUT_DIR: gets normal_features, index, features, results")
        add_embed_args(p)
        add_index_args(p)
        add_score_args(p)
    else:
        raise ValueError(f"unknown command {command}")
    return p


def parse(command: str, argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(dn2 arguments, the remaining Beam arguments). Bad arguments exit with code 2."""
    p = parser(command)
    args, beam_args = p.parse_known_args(argv)
    partition = getattr(args, "partition", "")
    for name in ("input", "output", "normal", "features", "index"):
        value = getattr(args, name, None)
        if value and "{partition}" in value:
            if not partition:
                p.error(f"--{name} contains {{partition}} but no --partition was given")
            setattr(args, name, value.replace("{partition}", partition))
    unknown = [a for a in beam_args if a.startswith("--") and not _is_beam_flag(a)]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, beam_args


def _is_beam_flag(arg: str) -> bool:
    name = arg[2:].split("=", 1)[0]
    known = PipelineOptions([]).get_all_options(retain_unknown_options=False)
    return name in known or name.replace("-", "_") in known


def beam_options(beam_args: Sequence[str]) -> PipelineOptions:
    """PipelineOptions with a local runner that never downloads anything by default."""
    options = PipelineOptions(list(beam_args))
    std = options.view_as(StandardOptions)
    if std.runner in (None, "DirectRunner", "direct"):
        std.runner = LOCAL_RUNNER
    direct = options.view_as(DirectOptions)
    if direct.direct_num_workers > 1 and "--direct_running_mode" not in " ".join(beam_args):
        direct.direct_running_mode = "multi_threading"
    if direct.direct_num_workers == 0:
        direct.direct_num_workers = os.cpu_count() or 1
    return options
