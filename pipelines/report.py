"""dn2 report RESULTS_DIR: render a results directory as one self-contained HTML page.

    python -m pipelines.report RESULTS_DIR [--output PATH] [--index DIR]
        [--top N] [--sample N] [--label-column NAME]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import fsspec

from dn2ops.report import write_report
from pipelines import options
from pipelines.common import guarded


def run(argv: Sequence[str] | None = None) -> int:
    """Writes the report and prints its path and size; returns the exit status."""
    args, _ = options.parse("report", argv)
    return guarded(lambda: report(args), "report")


def report(args: argparse.Namespace) -> None:
    written = write_report(args.results_dir, args.output, index_dir=args.index, top=args.top,
                           sample=args.sample, label_column=args.label_column)
    out_fs, out_path = fsspec.core.url_to_fs(written)
    print(f"{written} ({out_fs.size(out_path):,} bytes)")


if __name__ == "__main__":
    sys.exit(run())
