"""dn2 score (--input SRC | --features DIR) --index INDEX_DIR --output RESULTS_DIR [--top N]."""

from __future__ import annotations

from collections.abc import Sequence

from pipelines import jobs, options
from pipelines.common import guarded


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> int:
    args, beam_args = options.parse("score", argv)
    return guarded(lambda: jobs.score(
        index=args.index, output=args.output, input=args.input, features_dir=args.features,
        partition=args.partition, top=args.top, max_error_fraction=args.max_error_fraction,
        report=args.report, backbone=args.backbone, weights=args.weights,
        batch_size=args.batch_size, device=args.device, max_pixels=args.max_pixels,
        engine=args.engine, decode=args.decode, threads=args.threads,
        decode_threads=args.decode_threads, max_in_flight=args.reads_in_flight,
        group_by=args.group_by, pool=args.pool,
        group_score=args.group_score, stream_shards=args.stream_shards,
        options=options.beam_options(beam_args),
        test_pipeline=test_pipeline), "score")
