"""dn2 load-bigquery RESULTS_DIR --bigquery-table PROJECT.DATASET.TABLE: load a committed
results directory into BigQuery again, without scoring it again (dn2ops.io.bigquery).

Its partition (summary.json's, a date) replaces that partition's rows in TABLE,
TABLE_errors and TABLE_sets. Exit status 3 when BigQuery refuses or fails (README,
"Exit codes"); the results directory is only read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from dn2ops.errors import ConfigError
from dn2ops.io import bigquery
from pipelines import checks, options
from pipelines.common import guarded


def run(argv: Sequence[str] | None = None) -> int:
    args, _ = options.parse("load-bigquery", argv)
    return guarded(lambda: print(json.dumps(
        bigquery.load_results(args.results_dir, args.bigquery_table), indent=2)),
        "load-bigquery")


def preflight(table: str | None, beam_options) -> None:
    """dn2 score / run with --bigquery-table, before any work: a template launch is
    refused (nothing would load after its job), and the table's dataset must be readable."""
    if not table:
        return
    if checks.is_template(beam_options):
        raise ConfigError("--bigquery-table loads after the job commits, which a template "
                          "launch does not wait for; load each night with `dn2 load-bigquery "
                          "RESULTS_DIR --bigquery-table ...` after its job")
    bigquery.check_dataset(table)


def load_after(output: str, table: str | None, summary: dict | None) -> None:
    """dn2 score / run: loads the committed ``output`` into ``table`` when one was given
    and the job committed here (``summary``; a template launch returns none)."""
    if table and summary:
        bigquery.load_results(output, table)


if __name__ == "__main__":
    sys.exit(run())
