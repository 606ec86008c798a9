"""``dn2 report``: render a results directory as one self-contained HTML page.

    python -m pipelines.report RESULTS_DIR [--output PATH] [--index DIR]
        [--top N] [--sample N] [--label-column NAME]
"""

from __future__ import annotations

import argparse
import sys

import fsspec

from dn2ops.io.outputs import OutputError
from dn2ops.report import write_report


def _non_negative(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``dn2 report``."""
    parser = argparse.ArgumentParser(
        prog="dn2 report",
        description="Render a dn2 results directory as one self-contained HTML report.",
    )
    parser.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="output of `dn2 score` (committed: with its _SUCCESS marker)")
    parser.add_argument(
        "--output", metavar="PATH", help="where to write (default: RESULTS_DIR/report.html)"
    )
    parser.add_argument(
        "--index",
        metavar="DIR",
        help="normal index dir; its leave-one-out scores are drawn under the partition's "
        "(default: summary.json's index_dir when reachable)",
    )
    parser.add_argument(
        "--top", type=_non_negative, default=20, metavar="N", help="anomalies shown (default 20)"
    )
    parser.add_argument(
        "--sample",
        type=_non_negative,
        default=200,
        metavar="N",
        help="random other images shown (default 200)",
    )
    parser.add_argument(
        "--label-column",
        default="label",
        metavar="NAME",
        help="ground-truth column for the ROC curve (default: label)",
    )
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv``, write the report, print its path and size; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        written = write_report(
            args.results_dir,
            args.output,
            index_dir=args.index,
            top=args.top,
            sample=args.sample,
            label_column=args.label_column,
        )
    except (OutputError, FileNotFoundError) as exc:  # not committed results, or no index
        print(f"dn2 report: {exc}", file=sys.stderr)
        return 1
    out_fs, out_path = fsspec.core.url_to_fs(written)
    print(f"{written} ({out_fs.size(out_path):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(run())
