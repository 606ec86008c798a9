"""Resume after a crash (issue 30): ``dn2 embed`` with its defaults, uninterrupted, then
killed with SIGKILL once about ``--fraction`` of the images are sealed (dn2ops.io.pieces),
then run again into the same output, which resumes from the sealed pieces.

Printed side by side per store: the uninterrupted run's wall, when the kill came (and
the share of images sealed then), the rerun's wall and its ratio to the uninterrupted
one (goal: <= 0.55 at a kill near 60 %), the same for CPU seconds (user + system, which
the machine's other load hardly changes), what the rerun said it resumed, and whether its
committed output equals the uninterrupted run's: the same rows (uri, sha256) and the
same features (numpy, exact; the largest difference is printed too). Each run is its
own ``dn2 embed`` process; the exported model is cached first (an unmeasured embed of
two images), as on a machine that ran dn2 before.

    python benchmarks/resume.py [--png MANIFEST] [--photos MANIFEST] [--fraction 0.6] \\
        [--scratch bench-out/resume] [--stores png,photos] [--repeat N] [--floor] \\
        [-- EXTRA dn2 embed FLAGS]

``--floor``: each cycle also times a fresh ``dn2 embed`` of only the images the kill left
unsealed (a manifest of them, another output): what a rerun would cost if resuming cost
nothing, as a share of the uninterrupted run. On a short run the fixed start-up of a
``dn2 embed`` process (Beam's import, building and starting the graph, the model) is a
large part of it.

The manifests default to the issue 29 workloads (1,000 Fashion-MNIST PNGs and 256 12 MP
photos), written under ``SCRATCH/stores`` by benchmarks/worker_memory.py's ``stores``.
Each cycle's own ratio (its rerun over the uninterrupted run just before it) is printed
too, with their median: on a 10 s workload a cycle varies by about 0.5 s.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
    sys.path.insert(0, REPO)

from benchmarks.datasets import write_manifest  # noqa: E402
from benchmarks.markdown import table  # noqa: E402
from benchmarks.worker_memory import stores  # noqa: E402
from dn2ops.io import features, pieces  # noqa: E402
from dn2ops.io.sources import read_manifest  # noqa: E402

RESUMED = re.compile(r"resumed (\d+) of (\d+) images from (\d+) sealed pieces")


def _cmd(manifest: str, out: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "embed", "--input", manifest,
            "--output", out, *extra]


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def timed(manifest: str, out: str, extra: list[str], log: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one ``dn2 embed`` process. The CPU
    seconds hardly change with what else runs on the machine; the wall does."""
    started, cpu = time.perf_counter(), _cpu()
    with open(log, "w") as err:
        subprocess.run(_cmd(manifest, out, extra), cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=err, check=True)
    return time.perf_counter() - started, _cpu() - cpu


def sealed_rows(out: str, seen: dict[str, int]) -> int:
    """Rows in the seals under OUT's staging folders (each seal read once)."""
    for s in glob.glob(f"{out}/_staging-*/{pieces.PIECES}/*.json"):
        if s not in seen:
            try:
                seen[s] = int(json.load(open(s))["rows"])
            except (ValueError, KeyError, OSError):
                continue  # being written: read it next time
    return sum(seen.values())


def killed(manifest: str, out: str, extra: list[str], at: int, log: str) -> dict:
    """Runs ``dn2 embed`` and SIGKILLs it once ``at`` rows are sealed."""
    seen: dict[str, int] = {}
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(_cmd(manifest, out, extra), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            if sealed_rows(out, seen) >= at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - started,
            "sealed": sealed_rows(out, seen)}


def unsealed(manifest: str, out: str) -> list[dict]:
    """The manifest's rows whose uri no seal under OUT's staging folders lists."""
    sealed = set()
    for s in glob.glob(f"{out}/_staging-*/{pieces.PIECES}/*.json"):
        sealed |= {uri for uri, *_ in json.load(open(s))["inputs"]}
    return [r for r in read_manifest(manifest) if r["uri"] not in sealed]


def rows(directory: str) -> dict[tuple[str, str], np.ndarray]:
    table_, X, _ = features.load_features(directory)
    keys = zip(table_.column("uri").to_pylist(), table_.column("sha256").to_pylist(),
               strict=True)
    return dict(zip(keys, X, strict=True))


def compare(a: str, b: str) -> tuple[bool, bool, float | None]:
    """(same rows, same features exactly, largest |difference|) of two features dirs."""
    ra, rb = rows(a), rows(b)
    if ra.keys() != rb.keys():
        return False, False, None
    diff = max(float(np.abs(ra[k] - rb[k]).max()) for k in ra)
    return True, all(np.array_equal(ra[k], rb[k]) for k in ra), diff


def bench(name: str, manifest: str, scratch: str, fraction: float, extra: list[str],
          repeat: int = 1, floor: bool = False) -> dict:
    """The fastest of ``repeat`` uninterrupted runs against the fastest of ``repeat``
    kill-and-rerun cycles (the machine's load varies), with what that rerun resumed;
    the comparison of outputs is the last cycle's."""
    n = sum(1 for _ in read_manifest(manifest))
    base = os.path.join(scratch, name)
    subprocess.run(["rm", "-rf", base], check=True)
    os.makedirs(base)
    warm = os.path.join(base, "warm.csv")  # the export cached, unmeasured
    write_manifest(list(read_manifest(manifest))[:2], warm)
    timed(warm, os.path.join(base, "warm"), extra, os.path.join(base, "warm.log"))
    wholes, cycles, floors = [], [], []
    out = os.path.join(base, "resumed")
    for _ in range(repeat):
        subprocess.run(["rm", "-rf", os.path.join(base, "whole"), out], check=True)
        wholes.append(timed(manifest, os.path.join(base, "whole"), extra,
                            os.path.join(base, "whole.log")))
        kill = killed(manifest, out, extra, int(np.ceil(fraction * n)),
                      os.path.join(base, "killed.log"))
        if kill["returncode"] != -signal.SIGKILL:
            raise RuntimeError(f"{name}: the run ended ({kill}) before it could be killed")
        rest = os.path.join(base, "rest.csv")
        write_manifest(unsealed(manifest, out), rest)
        rerun = timed(manifest, out, extra, os.path.join(base, "rerun.log"))
        if floor:
            subprocess.run(["rm", "-rf", os.path.join(base, "rest")], check=True)
            floors.append(timed(rest, os.path.join(base, "rest"), extra,
                                os.path.join(base, "rest.log"))[0])
        said = RESUMED.findall(open(os.path.join(base, "rerun.log")).read())
        cycles.append((rerun, kill, said[-1] if said else None))
    whole, whole_cpu = min(wholes)
    (rerun, rerun_cpu), kill, said = min(cycles, key=lambda c: c[0])
    same_rows, same_features, diff = compare(os.path.join(base, "whole"), out)
    return {"store": name + (f" ({' '.join(extra)})" if extra else ""), "images": n,
            "whole_s": round(whole, 1), "whole_all_s": [round(w, 1) for w, _ in wholes],
            "rerun_all_s": [round(c[0][0], 1) for c in cycles],
            "whole_cpu_s": round(whole_cpu, 1), "rerun_cpu_s": round(rerun_cpu, 1),
            "cpu_ratio": round(rerun_cpu / whole_cpu, 3),
            "killed_at_s": round(kill["seconds"], 1), "sealed_at_kill": kill["sealed"],
            "rerun_s": round(rerun, 1), "ratio": round(rerun / whole, 3),
            "cycle_ratios": [round(c[0][0] / w, 3) for c, (w, _) in zip(cycles, wholes,
                                                                         strict=True)],
            "resumed": " of ".join(said[:2]) if said else "nothing",
            "pieces": int(said[2]) if said else 0, "same_rows": same_rows,
            "same_features": same_features, "max_diff": diff,
            **({"floor_all_s": [round(f, 1) for f in floors],
                "floor_ratios": [round(f / w, 3) for f, (w, _) in zip(floors, wholes,
                                                                       strict=True)]}
               if floor else {})}


def markdown(res: list[dict]) -> str:
    return table(
        ["store", "images", "uninterrupted (s)", "killed at (s)", "sealed at the kill",
         "rerun (s)", "rerun / uninterrupted", "each cycle's ratio (median)",
         "CPU s: uninterrupted, rerun (ratio)",
         "resumed", "pieces", "same rows", "same features (max |diff|)"],
        [[r["store"], str(r["images"]), f"{r['whole_s']:.1f}", f"{r['killed_at_s']:.1f}",
          f"{r['sealed_at_kill']} ({r['sealed_at_kill'] / r['images']:.0%})",
          f"{r['rerun_s']:.1f}", f"{r['ratio']:.2f}",
          " ".join(f"{x:.2f}" for x in r["cycle_ratios"])
          + f" ({np.median(r['cycle_ratios']):.2f})",
          f"{r['whole_cpu_s']:.1f}, {r['rerun_cpu_s']:.1f} ({r['cpu_ratio']:.2f})",
          r["resumed"], str(r["pieces"]),
          str(r["same_rows"]), f"{r['same_features']} ({r['max_diff']})"] for r in res])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--png", help="manifest (default: 1,000 Fashion-MNIST PNGs)")
    ap.add_argument("--photos", help="manifest (default: 256 12 MP photos)")
    ap.add_argument("--fraction", type=float, default=0.6)
    ap.add_argument("--scratch", default="bench-out/resume")
    ap.add_argument("--stores", default="png,photos")
    ap.add_argument("--repeat", type=int, default=1, help="cycles; the fastest is shown")
    ap.add_argument("--floor", action="store_true",
                    help="also time a fresh embed of only the images each kill left unsealed")
    ap.add_argument("extra", nargs="*", help="more dn2 embed flags (after --)")
    args = ap.parse_args(argv)
    if not (args.png and args.photos):
        made = stores(os.path.join(args.scratch, "stores"), 1000, 256)
        args.png, args.photos = args.png or made["png"], args.photos or made["photos"]
    res = []
    for name in args.stores.split(","):
        res.append(bench(name, getattr(args, name), args.scratch, args.fraction, args.extra,
                         args.repeat, args.floor))
        print(json.dumps(res[-1]), flush=True)
    print(markdown(res))
    for r in res:
        if "floor_ratios" in r:
            print(f"{r['store']}: a fresh run of only the unsealed images, each cycle: "
                  f"{' '.join(f'{x:.1f}' for x in r['floor_all_s'])} s, "
                  f"{' '.join(f'{x:.2f}' for x in r['floor_ratios'])} of the uninterrupted "
                  f"run (median {np.median(r['floor_ratios']):.2f})")
    with open(os.path.join(args.scratch, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
