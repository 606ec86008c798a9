"""dn2 run --normal SRC --input SRC --output OUT_DIR: the whole nightly job in one command.

Writes OUT_DIR/normal_features, OUT_DIR/index, OUT_DIR/features and
OUT_DIR/results (the ranked table: OUT_DIR/results/anomalies-*.parquet); with
--bigquery-table, OUT_DIR/results is loaded into BigQuery after the commit.
"""

from __future__ import annotations

from collections.abc import Sequence

from dn2ops.io import outputs
from pipelines import jobs, load_bigquery, options
from pipelines.common import guarded


def run(argv: Sequence[str] | None = None) -> int:
    args, beam_args = options.parse("run", argv)

    def job() -> None:
        beam_options = options.beam_options(beam_args)
        load_bigquery.preflight(args.bigquery_table, beam_options)
        summary = jobs.run(normal=args.normal, input=args.input, output=args.output,
                           config=args.config, options=beam_options)
        load_bigquery.load_after(outputs.join(args.output, "results"), args.bigquery_table,
                                 summary)

    return guarded(job, "run")
