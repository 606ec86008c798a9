"""The fixed cost of Beam's local multi-processing, without dn2: a trivial pipeline
(Create 8 numbers, Reshuffle, Map, Count) in one process and in ``--direct_num_workers N
--direct_running_mode multi_processing``, beside ``dn2 embed`` of 2 images both ways.
What N processes add to a tiny job is what they add to every job (docs/memory.md).

    python benchmarks/beam_processes.py [--workers 4] [--repeat 2] [--manifest TWO.csv]

Without ``--manifest`` the 2 images are the first two Fashion-MNIST test images, written
as PNGs under ``bench-out/beam_processes``. Wall and CPU seconds (user + system) of each
whole process tree (resource.getrusage of the children); the fastest of ``--repeat``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
    sys.path.insert(0, REPO)

from benchmarks.markdown import table  # noqa: E402

TRIVIAL = """
import sys
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
with beam.Pipeline(options=PipelineOptions(sys.argv[1:])) as p:
    (p | beam.Create(list(range(8))) | beam.Reshuffle() | beam.Map(lambda x: x * 2)
       | beam.combiners.Count.Globally())
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> list[list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--manifest")
    ap.add_argument("--scratch", default="bench-out/beam_processes")
    args = ap.parse_args(argv)
    manifest = args.manifest
    if not manifest:
        from benchmarks.worker_memory import stores

        manifest = stores(args.scratch, 2, 0)["png"]
    many = ["--direct_num_workers", str(args.workers), "--direct_running_mode",
            "multi_processing"]
    out = os.path.join(args.scratch, "out")
    jobs = {
        "trivial Beam pipeline": [sys.executable, "-c", TRIVIAL],
        "dn2 embed, 2 images": [sys.executable, "-m", "pipelines.cli", "embed", "--input",
                                manifest, "--output", out],
    }
    rows = []
    for name, cmd in jobs.items():
        got = {}
        for label, extra in (("1 process", []), (f"{args.workers} processes", many)):
            runs = []
            for _ in range(args.repeat):
                subprocess.run(["rm", "-rf", out], check=True)
                runs.append(timed(cmd + extra))
            got[label] = min(runs)
        (w1, c1), (wn, cn) = got.values()
        rows.append([name, f"{w1:.2f}", f"{wn:.2f}", f"+{wn - w1:.2f}", f"{c1:.1f}",
                     f"{cn:.1f}", f"+{cn - c1:.1f}"])
    print(table(["job", "1 process: wall s", f"{args.workers} processes: wall s",
                 "added wall s", "1 process: CPU s", f"{args.workers} processes: CPU s",
                 "added CPU s"], rows))
    return rows


if __name__ == "__main__":
    main()
