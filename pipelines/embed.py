"""dn2 embed --input SRC --output FEATURES_DIR [--backbone NAME] [Beam options]."""

from __future__ import annotations

from collections.abc import Sequence

from pipelines import jobs, options
from pipelines.common import guarded


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> int:
    args, beam_args = options.parse("embed", argv)
    return guarded(lambda: jobs.embed(
        input=args.input, output=args.output, config=args.config.embed, reuse=args.reuse,
        options=options.beam_options(beam_args),
        test_pipeline=test_pipeline), "embed")
