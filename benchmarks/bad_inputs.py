"""Bad inputs, a killed run and mismatched inputs through the dn2 command, as a user sees them.

Builds the corpus of tests/pipelines/test_reliability.py (bad and odd files mixed with real
handwritten digits, all generated here) in a temporary directory, runs ``dn2 run`` on it and
prints, for every file, whether it was scored or which error (stage and reason) it got; then
kills a ``dn2 score`` with SIGKILL mid-way, reruns it and compares the ranked rows with an
uninterrupted run; then prints the message of every check that refuses mismatched, damaged
or misplaced inputs before any heavy work.

    python benchmarks/bad_inputs.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the corpus builders live with the tests

from benchmarks.datasets import write_png_store  # noqa: E402
from dn2ops.io import outputs  # noqa: E402
from pipelines.cli import main  # noqa: E402
from tests.conftest import digit_images  # noqa: E402
from tests.pipelines.test_reliability import (  # noqa: E402
    kill_when_staged,
    looks_complete,
    outcome_table,
    prepare_mismatches,
    ranked_rows,
    run_corpus,
    same_ranking,
)


def quiet_main(argv: list[str]) -> tuple[int, str]:
    """(exit code, what dn2 printed on stderr) of ``dn2 ARGV`` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue().strip()


def print_table(rows: list[dict[str, str]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns[:-1]}
    print("  ".join(c.ljust(widths.get(c, 0)) for c in columns))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths.get(c, 0)) for c in columns))


def bad_inputs(root: Path) -> Path:
    print("== 1. The corpus through `dn2 run --normal normal/ --input incoming/incoming.csv`\n")
    t0 = time.perf_counter()
    code, cases, out = run_corpus(root)
    print(f"dn2 run exit code: {code} ({time.perf_counter() - t0:.1f} s)\n")
    rows = outcome_table(root, cases, out / "results")
    for r in rows:
        r["ok"] = "ok" if r["outcome"] == r["expected"] else "UNEXPECTED"
    print_table(rows, ["name", "what", "ok", "outcome", "detail"])
    summary = json.loads((out / "results" / "summary.json").read_text())
    print(f"\nsummary.json: count_in={summary['count_in']} scored={summary['scored']} "
          f"errored={summary['errored']} errors_by_stage={summary['errors_by_stage']}; "
          f"count_in == scored + errored: "
          f"{summary['count_in'] == summary['scored'] + summary['errored']}")
    bad = summary["errored"] / summary["count_in"]
    for limit in (round(bad - 0.05, 2), round(bad + 0.05, 2)):
        code, err = quiet_main(["score", "--features", str(out / "features"), "--index",
                                str(out / "index"), "--output",
                                str(root / f"results-max-{limit}"),
                                "--max-error-fraction", str(limit)])
        print(f"--max-error-fraction {limit}: exit {code}" + (f"; {err}" if err else ""))
    return out


def kill_and_rerun(root: Path, out: Path) -> None:
    print("\n== 2. `dn2 score` killed with SIGKILL mid-way, then rerun\n")
    _, incoming, _ = digit_images(n_incoming=40)
    store = root / "kill-store"
    write_png_store(incoming, [f"i{i:03d}" for i in range(len(incoming))], str(store))
    args = ["score", "--input", str(store), "--index", str(out / "index"), "--batch-size", "8"]
    t0 = time.perf_counter()
    code, _ = quiet_main([*args, "--output", str(root / "kill-reference")])
    print(f"uninterrupted run: exit {code}, {len(ranked_rows(root / 'kill-reference'))} ranked "
          f"rows ({time.perf_counter() - t0:.1f} s)")
    results = root / "kill-results"
    killed = kill_when_staged([*args, "--output", str(results)], results, root / "kill.log")
    status = ("killed by SIGKILL" if killed["returncode"] == -signal.SIGKILL
              else f"exit {killed['returncode']}")
    print(f"subprocess: {status} {killed['seconds']} s after start, as "
          f"{results.name}/_staging-* appeared (it held {killed['staged'] or 'nothing yet'})")
    print(f"left in {results.name}/: {sorted(p.name for p in results.iterdir())}")
    print(f"files a reader could take for complete output: {looks_complete(results) or 'none'}")
    try:
        outputs.require_complete(str(results), "results")
        print("require_complete: ACCEPTED (wrong)")
    except outputs.OutputError as e:
        print(f"require_complete refuses: {e}")
    code, err = quiet_main(["report", str(results)])
    print(f"dn2 report on it: exit {code}; {err}")
    t0 = time.perf_counter()
    code, _ = quiet_main([*args, "--output", str(results)])
    same, diff = same_ranking(results, root / "kill-reference")
    print(f"rerun: exit {code} ({time.perf_counter() - t0:.1f} s); same uris in the same ranks "
          f"as the uninterrupted run: {same}; largest score difference {diff:.2e}; left: "
          f"{sorted(p.name for p in results.iterdir())}")
    # A finished partition rerun from another input: replaced, not appended.
    again = ["--index", str(out / "index"), "--output", str(results)]
    quiet_main(["score", "--features", str(out / "normal_features"), *again])
    n = len(ranked_rows(results))
    print(f"same partition rerun from another input (the {n} normal images): {n} ranked rows, "
          f"{len(list(results.glob('anomalies-*.parquet')))} anomalies file")


def mismatches(root: Path, out: Path) -> None:
    print("\n== 3. Checks before any heavy work (exit code, message as the user sees it)\n")
    for m in prepare_mismatches(out, root, root / "mismatch"):
        t0 = time.perf_counter()
        code, err = quiet_main(m.argv)
        seen = all(piece in err for piece in m.expect)
        untouched = m.untouched is None or not m.untouched.exists()
        print(f"- {m.label}  [exit {code}, {time.perf_counter() - t0:.1f} s, "
              f"{'names what differs' if seen else 'MESSAGE MISSES ' + repr(m.expect)}"
              f"{'' if untouched else ', WORK WAS STARTED'}]")
        print(f"    $ dn2 {m.argv[0]} ...\n    {err}")


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keep", type=Path, help="write everything here and keep it")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)  # dn2's INFO progress would bury the tables
    root = args.keep or Path(tempfile.mkdtemp(prefix="dn2-bad-inputs-"))
    try:
        out = bad_inputs(root)
        kill_and_rerun(root, out)
        mismatches(root, out)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    run()
