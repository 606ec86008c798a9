"""dn2 score (--input SRC | --features DIR) --index INDEX_DIR --output RESULTS_DIR [--top N]."""

from __future__ import annotations

from collections.abc import Sequence

from pipelines import jobs, options
from pipelines.common import guarded


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> int:
    args, beam_args = options.parse("score", argv)
    return guarded(lambda: jobs.score(
        index=args.index, output=args.output, input=args.input, features_dir=args.features,
        config=args.config, options=options.beam_options(beam_args),
        test_pipeline=test_pipeline), "score")
