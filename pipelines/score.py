"""dn2 score (--input SRC | --features DIR) --index INDEX_DIR --output RESULTS_DIR [--top N]
[--bigquery-table PROJECT.DATASET.TABLE: loaded after the commit, pipelines.load_bigquery]."""

from __future__ import annotations

from collections.abc import Sequence

from pipelines import jobs, load_bigquery, options
from pipelines.common import guarded


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> int:
    args, beam_args = options.parse("score", argv)

    def job() -> None:
        beam_options = options.beam_options(beam_args)
        load_bigquery.preflight(args.bigquery_table, beam_options)
        summary = jobs.score(
            index=args.index, output=args.output, input=args.input,
            features_dir=args.features, config=args.config, options=beam_options,
            test_pipeline=test_pipeline)
        load_bigquery.load_after(args.output, args.bigquery_table, summary)

    return guarded(job, "score")
