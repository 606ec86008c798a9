"""Peak memory of a CPU-engine worker process that loads its model from a warm export cache.

What a Beam worker does in ``load_model()``: it receives the pickled EmbedPlan that the
launcher resolved, and the ONNX Runtime handler opens the cached export. Each row is its
own fresh process under ``/usr/bin/time -v`` (peak RSS; and its RSS once loaded,
the seconds load_model took and whether torch was imported, from inside it), run ``--repeat`` times
(medians shown): ``imports`` only imports the worker's modules and unpickles the plan;
``load_model`` then loads the model as a worker does. The plan is made and the cache
warmed beforehand, each by its own process, so neither counts.

With ``--previous PATH`` (a checkout of the code before, e.g. ``git archive`` of main
unpacked there) the same rows run with that code, side by side. Each code keeps its own
cache (before: its /tmp/dn2-exports; this code: ``--cache-dir``, default a private
directory under --scratch), warmed first.

    flock /tmp/dn2-cpu.lock python benchmarks/worker_model_memory.py \\
        [--backbone efficientnet_lite0+efficientnet_lite1] [--previous ../base]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAKE_PLAN = """
import dataclasses, sys
import cloudpickle  # as Beam pickles a DoFn: a spec holds lambdas
from dn2ops.config import EmbedConfig
from dn2ops.embed.plan import EmbedPlan
fields = {f.name for f in dataclasses.fields(EmbedConfig)}
extra = {"cache_dir": sys.argv[3]} if "cache_dir" in fields and sys.argv[3] else {}
config = EmbedConfig(backbone=sys.argv[2], engine="onnxruntime", device="cpu", **extra)
cloudpickle.dump(EmbedPlan.resolve(config), open(sys.argv[1], "wb"))
"""

WORKER = """
import json, pickle, sys, time
import psutil
import dn2ops.engines.onnxruntime
from dn2ops.engines.auto import make_handler
plan = pickle.load(open(sys.argv[1], "rb"))
t = time.perf_counter()
if sys.argv[2] == "load_model":
    session = make_handler(plan).load_model()
    assert session.get_outputs()[0].shape[1] == plan.spec.dim
print(json.dumps({"load_s": time.perf_counter() - t, "torch": "torch" in sys.modules,
                  "rss_after": psutil.Process().memory_info().rss}))
"""


def run_code(code: str, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": code}
    subprocess.run([sys.executable, "-c", MAKE_PLAN if args[0] == "plan" else WORKER,
                    *args[1:]], env=env, cwd=code, check=True)


def measure_worker(code: str, plan: str, what: str) -> dict:
    """One worker process under /usr/bin/time -v: its peak RSS, its RSS once the model is
    loaded, and the seconds load_model took (MiB, s)."""
    res = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", WORKER, plan, what],
                         env={**os.environ, "PYTHONPATH": code}, cwd=code,
                         capture_output=True, text=True, check=True)
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    got = json.loads(res.stdout.strip().splitlines()[-1])
    return {"peak": peak / 1024, "after": got["rss_after"] / 2**20, "load_s": got["load_s"],
            "torch": got["torch"]}


def measure_code(code: str, plan: str, repeat: int) -> dict:
    run_code(code, ["worker", plan, "load_model"])  # warms the cache
    rows = {}
    for what in ("imports", "load_model"):
        runs = [measure_worker(code, plan, what) for _ in range(repeat)]
        rows[what] = {k: round(statistics.median(r[k] for r in runs), 2)
                      for k in ("peak", "after", "load_s")}
        rows[what]["torch_imported"] = any(r["torch"] for r in runs)
        rows[what]["peak_runs"] = [round(r["peak"], 1) for r in runs]
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="efficientnet_lite0+efficientnet_lite1")
    ap.add_argument("--previous", default=None, help="checkout of the code to compare with")
    ap.add_argument("--scratch", default="bench-out/worker_model_memory")
    ap.add_argument("--cache-dir", default=None, help="this code's cache (default: "
                    "SCRATCH/cache)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    scratch = os.path.abspath(args.scratch)
    os.makedirs(scratch, exist_ok=True)
    cache = args.cache_dir or os.path.join(scratch, "cache")
    codes = {"this": REPO, **({"previous": os.path.abspath(args.previous)}
                              if args.previous else {})}
    out = {"backbone": args.backbone}
    for tag, code in codes.items():
        plan = os.path.join(scratch, f"plan-{tag}.pkl")
        run_code(code, ["plan", plan, args.backbone, cache])
        out[tag] = measure_code(code, plan, args.repeat)
    print(f"{args.backbone}, medians of {args.repeat} processes: peak RSS, RSS once loaded "
          "(MiB), load_model (s), torch imported")
    print(f"{'process':<12}" + "".join(f"{tag:>30}" for tag in codes))
    for what in ("imports", "load_model"):
        print(f"{what:<12}" + "".join(
            f"{out[t][what]['peak']:>10.1f}{out[t][what]['after']:>8.1f}"
            f"{out[t][what]['load_s']:>6.2f}{str(out[t][what]['torch_imported']):>6}"
            for t in codes))
    with open(os.path.join(scratch, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
