"""Peak memory of ``dn2 embed`` (and of group-mode scoring) as the number of images grows.

Fashion-MNIST train PNGs (Debian's dataset, written once into --scratch) are
embedded by ``dn2 embed`` at each size, each run as its own process under
``/usr/bin/time -v``: wall time, peak RSS, images/s, and the peak RSS added per
extra image between the smallest and the largest size. The embedded features are
then scored in group mode (``dn2 score --group-by lot --group-score covtrace``,
lots of 20 images from a manifest column), measured the same way.

    flock /tmp/dn2-cpu.lock python benchmarks/embed_memory.py [--sizes 2000,20000]
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
from benchmarks.score_memory import measure  # noqa: E402

LOT = 20  # images a lot (group mode)


def store(scratch: str, n: int) -> str:
    """A manifest of the first n train images (PNGs under scratch/png), with a lot column."""
    images, _ = load_fashion_mnist(split="train")
    names = [f"train-{i:05d}" for i in range(n)]
    write_png_store(images[:n], names, os.path.join(scratch, "png"))
    manifest = os.path.join(scratch, f"manifest-{n}.csv")
    write_manifest([{"uri": f"png/{name}.png", "lot": f"lot{i // LOT:05d}"}
                    for i, name in enumerate(names)], manifest)
    return manifest


def run_one(args: list[str], out: str) -> dict:
    subprocess.run(["rm", "-rf", out], check=True)
    return measure([sys.executable, "-m", "pipelines.cli", *args, "--output", out], REPO)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--scratch", default="bench-out/embed_memory")
    ap.add_argument("--prepare-only", action="store_true", help="write the PNG stores only")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    args.scratch = os.path.abspath(args.scratch)
    os.makedirs(args.scratch, exist_ok=True)
    manifests = {n: store(args.scratch, n) for n in sizes}
    if args.prepare_only:
        return {}
    results = {}
    for n in sizes:
        manifest = manifests[n]
        feats = os.path.join(args.scratch, f"features-{n}")
        r = run_one(["embed", "--input", manifest, "--device", "cpu"], feats)
        g = run_one(["score", "--features", feats, "--group-by", "lot",
                     "--group-score", "covtrace"], os.path.join(args.scratch, f"groups-{n}"))
        results[n] = {"embed": {**r, "images_per_s": round(n / r["wall_s"], 1)},
                      "groups": {**g, "images_per_s": round(n / g["wall_s"], 1)}}
        for what, m in results[n].items():
            print(f"{what:>6} {n:>7,} images: {m['wall_s']:7.1f} s  {m['images_per_s']:7.0f} "
                  f"images/s  peak RSS {m['peak_rss_bytes'] / 2**30:5.2f} GiB", flush=True)
    if len(sizes) > 1:
        a, b = sizes[0], sizes[-1]
        for what in ("embed", "groups"):
            per = ((results[b][what]["peak_rss_bytes"] - results[a][what]["peak_rss_bytes"])
                   / (b - a))
            results[f"{what}_bytes_per_image"] = round(per)
            print(f"{what}: peak RSS grows {per:,.0f} bytes an image from {a:,} to {b:,}")
    with open(os.path.join(args.scratch, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
