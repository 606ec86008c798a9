"""What ``--explain N`` costs the nightly run: ``dn2 score --input`` over a partition of
Fashion-MNIST PNGs (default 10,000 test images) against an index of normal images, with
``--explain 0`` and with ``--explain N`` (default 20), side by side: wall time and the
peak RSS summed over the process tree (psutil, every 0.2 s; benchmarks.worker_memory's
measure), alternated ``--repeat`` times so drift on a shared machine hits both.

The normal set (``--normal`` train images of every class) is embedded and indexed once,
unmeasured.

    python benchmarks/explain_cost.py [--images 10000] [--normal 2000] [--explain 20] \\
        [--repeat 1] [--scratch bench-out/explain_cost]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
    sys.path.insert(0, REPO)

from benchmarks.datasets import load_fashion_mnist, write_manifest, write_png_store  # noqa: E402
from benchmarks.worker_memory import measure  # noqa: E402

DN2 = [sys.executable, "-m", "pipelines.cli"]


def store(scratch: str, split: str, n: int) -> str:
    """A manifest of ``n`` PNGs of a Fashion-MNIST split, written once under ``scratch``."""
    images, _ = load_fashion_mnist(split=split)
    names = [f"{split}-{i:05d}" for i in range(n)]
    write_png_store(images[:n], names, os.path.join(scratch, split))
    manifest = os.path.join(scratch, f"{split}-{n}.csv")
    write_manifest([{"uri": os.path.join(scratch, split, f"{m}.png")} for m in names], manifest)
    return manifest


def index(scratch: str, normal: str) -> str:
    out = os.path.join(scratch, "index")
    if not os.path.exists(os.path.join(out, "_SUCCESS")):
        feats = os.path.join(scratch, "normal_features")
        subprocess.run(["rm", "-rf", feats, out], check=True)
        subprocess.run([*DN2, "embed", "--input", normal, "--output", feats], check=True,
                       cwd=REPO)
        subprocess.run([*DN2, "build-index", "--features", feats, "--output", out],
                       check=True, cwd=REPO)
    return out


def score(scratch: str, manifest: str, idx: str, explain: int, run: int) -> dict:
    out = os.path.join(scratch, f"results-explain{explain}-{run}")
    subprocess.run(["rm", "-rf", out], check=True)
    cmd = [*DN2, "score", "--input", manifest, "--index", idx, "--output", out, "--top", "20",
           "--explain", str(explain)]
    res = measure(cmd, REPO, out + ".log")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return {**res, "explain": explain, "scored": summary["scored"],
            "heatmaps": (summary.get("heatmaps") or {}).get("explained", 0)}


def stage_seconds(results: str, idx: str, n: int) -> str:
    """The explain stage's own work on the top ``n`` of a results directory, timed in this
    process (as the stage does it, serially): neighbour completion, the maps, the PNGs."""
    import tempfile
    import time

    from dn2ops.config import DEFAULT_BACKBONE
    from dn2ops.io import features
    from dn2ops.score import heatmaps

    top = sorted(features.read_table(results, "anomalies").to_pylist(),
                 key=lambda r: (r["rank"], r["uri"]))[:n]
    chosen = [(i + 1, (r["score"], r["uri"], tuple(r["neighbor_uris"])))
              for i, r in enumerate(top)]
    t0 = time.perf_counter()
    chosen = heatmaps.ExactNeighbours(idx, None, 4)(chosen)
    t1 = time.perf_counter()
    feats = heatmaps.PatchFeatures(DEFAULT_BACKBONE)
    done = [(p, heatmaps.explain(u, nb[:4], feats)) for p, (_, u, nb) in chosen]
    t2 = time.perf_counter()
    scale = max(e.scores.max() for _, e in done)
    with tempfile.TemporaryDirectory() as d:
        for item in done:
            heatmaps.write_heatmap(item, d, scale)
    t3 = time.perf_counter()
    return (f"explain stage alone: neighbours {t1 - t0:.1f} s, maps {t2 - t1:.1f} s, "
            f"PNGs {t3 - t2:.2f} s, total {t3 - t0:.1f} s")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--normal", type=int, default=2000)
    p.add_argument("--explain", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--scratch", default=os.path.join(REPO, "bench-out", "explain_cost"))
    a = p.parse_args(argv)
    os.makedirs(a.scratch, exist_ok=True)
    manifest = store(a.scratch, "test", a.images)
    idx = index(a.scratch, store(a.scratch, "train", a.normal))
    rows = []
    for run in range(a.repeat):
        order = (0, a.explain) if run % 2 == 0 else (a.explain, 0)
        rows += [score(a.scratch, manifest, idx, n, run) for n in order]
    print(f"{'explain':>7} {'scored':>7} {'heatmaps':>8} {'wall s':>7} {'peak GiB':>8}")
    for r in rows:
        print(f"{r['explain']:>7} {r['scored']:>7} {r['heatmaps']:>8} {r['wall_s']:>7} "
              f"{r['peak_gib']:>8}")
    base = [r for r in rows if r["explain"] == 0]
    with_ = [r for r in rows if r["explain"] != 0]
    wall0 = sum(r["wall_s"] for r in base) / len(base)
    wall1 = sum(r["wall_s"] for r in with_) / len(with_)
    print(f"extra wall time: {wall1 - wall0:+.1f} s ({(wall1 / wall0 - 1) * 100:+.1f} %); "
          f"peak RSS {max(r['peak_gib'] for r in base)} -> "
          f"{max(r['peak_gib'] for r in with_)} GiB")
    last = os.path.join(a.scratch, f"results-explain{a.explain}-{a.repeat - 1}")
    print(stage_seconds(last, idx, a.explain))
    return rows


if __name__ == "__main__":
    main()
