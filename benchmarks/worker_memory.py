"""Memory and speed of the embedding workers: ``dn2 embed`` with its defaults, in one
process and in four (``--direct_num_workers 4 --direct_running_mode multi_processing``),
on Fashion-MNIST PNGs and on 12 MP phone photos, side by side with an earlier checkout.

Each run is its own ``dn2 embed`` process (the launcher and, with multi_processing, the
SDK worker processes it starts). Every 0.2 s the benchmark sums the RSS of the whole
process tree (psutil): the peak of that sum is what a machine must hold. It also notes,
per process, whether ONNX Runtime's library or torch's is mapped (/proc/PID/maps), and
the CPU seconds of each SDK worker process: the live workers, counted by process id
(with a shared model, every worker imports the engine but one holds the model); the
model loads come from dn2's own log line (RunInference's load counter). Features of the
four-process runs are compared with the one-process run's, row by row (keyed by sha256).
Four processes run twice: by default (the model shared, dn2ops.engines.shared) and with
``--share-model off`` (a model a process).
Each code first embeds the photos once per backbone, unmeasured: every measured run finds
its exported model cached, as a worker does after its first export.

    python benchmarks/worker_memory.py [--previous CHECKOUT] [--png 1000] [--photos 256] \\
        [--scratch bench-out/worker_memory] [--repeat N] [--stores png] [--ways 'NAME|...']

``--previous``: a checkout of the code before (``git worktree add ../base HEAD``), run
with this interpreter and its own code on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
    sys.path.insert(0, REPO)

from benchmarks.datasets import (  # noqa: E402
    load_fashion_mnist,
    write_manifest,
    write_photo_store,
    write_png_store,
)
from benchmarks.markdown import table  # noqa: E402
from dn2ops.io import features  # noqa: E402

GIB = 2 ** 30
FOUR = ["--direct_num_workers", "4", "--direct_running_mode", "multi_processing"]
LOADS = re.compile(r"model loads: embedding (\d+)")


def stores(scratch: str, n_png: int, n_photos: int) -> dict[str, str]:
    """Manifests of the two workloads, written once under ``scratch`` (absolute paths: dn2
    reads a manifest's relative paths against the manifest's own folder)."""
    scratch = os.path.abspath(scratch)
    images, _ = load_fashion_mnist(split="test")
    names = [f"test-{i:05d}" for i in range(n_png)]
    write_png_store(images[:n_png], names, os.path.join(scratch, "png"))
    out = {"png": os.path.join(scratch, f"png-{n_png}.csv"),
           "photos": os.path.join(scratch, f"photos-{n_photos}.csv")}
    write_manifest([{"uri": os.path.join(scratch, "png", f"{n}.png")} for n in names],
                   out["png"])
    photos = write_photo_store(os.path.join(scratch, "photos"), n_photos,
                               workers=os.cpu_count() or 1)
    write_manifest([{"uri": p} for p in photos], out["photos"])
    return out


def _mapped(pid: int) -> tuple[bool, bool]:
    """(ONNX Runtime mapped, torch mapped) in process ``pid``."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
    except OSError:
        return False, False
    return "onnxruntime_pybind11_state" in maps, "libtorch_cpu" in maps


def measure(cmd: list[str], code: str, log: str) -> dict:
    """Runs ``cmd`` with ``code`` first on PYTHONPATH; peak summed RSS of its process tree."""
    env = {**os.environ, "PYTHONPATH": code}
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=err)
        root = psutil.Process(proc.pid)
        peak, per_pid, engines, torches, cpu = 0, {}, set(), set(), {}
        while proc.poll() is None:
            total = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for p in tree:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                per_pid[p.pid] = max(per_pid.get(p.pid, 0), rss)
                try:
                    if "sdk_worker_main" in " ".join(p.cmdline()):
                        t = p.cpu_times()
                        cpu[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
                ort, torch = _mapped(p.pid)
                if ort:
                    engines.add(p.pid)
                if torch:
                    torches.add(p.pid)
            peak = max(peak, total)
            time.sleep(0.2)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    text = open(log).read()
    loads = LOADS.findall(text)
    return {"wall_s": round(wall, 1), "peak_gib": round(peak / GIB, 2),
            "processes": len(per_pid),
            "engine_pids": len(engines), "torch_pids": len(torches),
            "worker_peak_gib": sorted(round(v / GIB, 2) for p, v in per_pid.items()
                                      if p in engines),
            "model_loads": int(loads[-1]) if loads else None,
            # SDK worker processes (multi_processing) and the CPU seconds each used: the
            # live workers, whether or not they hold the model
            "worker_cpu_s": sorted(round(v, 1) for v in cpu.values())}


def embed(code: str, manifest: str, out: str, extra: list[str]) -> dict:
    subprocess.run(["rm", "-rf", out], check=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [sys.executable, "-m", "pipelines.cli", "embed", "--input", manifest,
           "--output", out, *extra]
    return measure(cmd, code, out + ".log")


def feature_table(directory: str) -> dict[str, np.ndarray]:
    rows, x, _ = features.load_features(directory)
    return dict(zip(rows.column("sha256").to_pylist(), x, strict=True))


def max_diff(a: str, b: str) -> float | None:
    """max |difference| of the features of two runs, row by row; None if the rows differ."""
    fa, fb = feature_table(a), feature_table(b)
    if fa.keys() != fb.keys():
        return None
    return float(max(np.abs(fa[k] - fb[k]).max() for k in fa))


def run(args) -> dict:
    manifests = stores(args.scratch, args.png, args.photos)
    counts = {"png": args.png, "photos": args.photos}
    codes = {"after": REPO, **({"before": args.previous} if args.previous else {})}
    ways = {"default, 1 process": [], "default, 4 processes": FOUR,
            "4 processes, --share-model off": FOUR + ["--share-model", "off"],
            "efficientnet_lite0, 1 process": ["--backbone", "efficientnet_lite0"]}
    res: dict = {}
    for code in codes.values():  # the export cache warm, as on a worker that exported
        for backbone in ("efficientnet_lite0+efficientnet_lite1", "efficientnet_lite0"):
            embed(code, manifests["photos"], os.path.join(args.scratch, "out", "warm"),
                  ["--backbone", backbone])
    ways = {w: e for w, e in ways.items() if not args.ways or w in args.ways.split("|")}
    for store, manifest in manifests.items():
        if args.stores and store not in args.stores.split(","):
            continue
        for way, extra in ways.items():
            for tag, code in codes.items():
                if "--share-model" in extra and tag == "before":
                    continue  # the code before had no such flag (it never shared)
                out = os.path.join(args.scratch, "out", f"{store}-{tag}-{len(res)}")
                # alternating codes, the fastest of --repeat (the machine's load varies)
                r = min((embed(code, manifest, out, extra) for _ in range(args.repeat)),
                        key=lambda r: r["wall_s"])
                r["images_per_s"] = round(counts[store] / r["wall_s"], 1)
                r["out"] = out
                res[(store, way, tag)] = r
                print(store, way, tag, json.dumps(r), flush=True)
        for tag in codes:
            for way in ("default, 4 processes", "4 processes, --share-model off"):
                if (store, way, tag) in res:
                    one = res[(store, "default, 1 process", tag)]["out"]
                    res[(store, way, tag)]["max_diff_vs_1"] = max_diff(
                        one, res[(store, way, tag)]["out"])
    return res


def markdown(res: dict) -> str:
    rows = []
    for (store, way, tag), r in res.items():
        one = res.get((store, "default, 1 process", tag))
        ratio = (f"{r['wall_s'] / one['wall_s']:.2f}x" if "4 processes" in way else "")
        rows.append([store, way, tag, f"{r['peak_gib']:.2f}", f"{r['wall_s']:.1f}",
                     f"{r['images_per_s']:.1f}", ratio, str(r["engine_pids"]),
                     str(r["model_loads"]), str(r["torch_pids"]),
                     " ".join(f"{v:.1f}" for v in r["worker_cpu_s"]),
                     " ".join(f"{v:.2f}" for v in r["worker_peak_gib"]),
                     "" if "max_diff_vs_1" not in r else str(r["max_diff_vs_1"])])
    return table(["store", "run", "code", "peak RSS (GiB, tree)", "wall (s)", "images/s",
                  "wall vs 1 process", "processes with the engine", "model loads",
                  "processes with torch", "SDK worker processes' CPU s",
                  "engine processes' peaks (GiB)",
                  "max |feature diff| vs 1 process"], rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--png", type=int, default=1000)
    ap.add_argument("--photos", type=int, default=256)
    ap.add_argument("--scratch", default="bench-out/worker_memory")
    ap.add_argument("--previous", default=None, help="checkout of the code before")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each way; the fastest")
    ap.add_argument("--stores", default="", help="png,photos (default: both)")
    ap.add_argument("--ways", default="", help="run names joined by '|' (default: all)")
    args = ap.parse_args(argv)
    os.makedirs(args.scratch, exist_ok=True)
    res = run(args)
    print(markdown(res))
    with open(os.path.join(args.scratch, "results.json"), "w") as f:
        json.dump({" | ".join(k): v for k, v in res.items()}, f, indent=1)
    return res


if __name__ == "__main__":
    main()
