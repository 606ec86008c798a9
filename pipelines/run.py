"""dn2 run --normal SRC --input SRC --output OUT_DIR: the whole nightly job in one command.

Writes OUT_DIR/normal_features, OUT_DIR/index, OUT_DIR/features and
OUT_DIR/results (the ranked table: OUT_DIR/results/anomalies-*.parquet).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines import jobs, options
from pipelines.common import guarded


def run(argv: Sequence[str] | None = None) -> int:
    args, beam_args = options.parse("run", argv)
    return guarded(lambda: jobs.run(
        normal=args.normal, input=args.input, output=args.output, config=args.config,
        options=options.beam_options(beam_args)), "run")
