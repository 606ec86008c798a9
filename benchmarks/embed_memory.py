"""Peak memory of ``dn2 embed`` (and of group-mode scoring) as the number of images grows.

Fashion-MNIST train PNGs (Debian's dataset, written once into --scratch) are
embedded by ``dn2 embed`` at each size, each run as its own process under
``/usr/bin/time -v``: wall time, peak RSS, images/s, and the peak RSS added per
extra image between the smallest and the largest size. The embedded features are
then scored in group mode (``dn2 score --group-by lot --group-score covtrace``,
lots of 20 images from a manifest column), measured the same way.

With ``--previous PATH`` (a checkout of the code before, e.g. ``git archive`` of main)
each size is also embedded and scored by that code, side by side, and its features
table is compared with this code's (same rows, same values, same columns).

    flock /tmp/dn2-cpu.lock python benchmarks/embed_memory.py [--sizes 2000,20000] \\
        [--previous ../base]
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
from dn2ops.io import features  # noqa: E402

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


def run_one(args: list[str], out: str, code: str = REPO) -> dict:
    subprocess.run(["rm", "-rf", out], check=True)
    return measure([sys.executable, "-m", "pipelines.cli", *args, "--output", out], code)


def measure_size(scratch: str, manifest: str, n: int, code: str, tag: str) -> dict:
    """dn2 embed, then group-mode scoring of its features, each as its own process."""
    feats = os.path.join(scratch, f"features-{n}{tag}")
    r = run_one(["embed", "--input", manifest, "--device", "cpu"], feats, code)
    g = run_one(["score", "--features", feats, "--group-by", "lot", "--group-score",
                 "covtrace"], os.path.join(scratch, f"groups-{n}{tag}"), code)
    return {"embed": {**r, "images_per_s": round(n / r["wall_s"], 1)},
            "groups": {**g, "images_per_s": round(n / g["wall_s"], 1)}}


def same_features(a: str, b: str) -> bool:
    """Two features directories hold the same rows (in any order and sharding)."""
    ta, tb = (features.read_table(d, "features").sort_by("uri") for d in (a, b))
    return ta.schema.equals(tb.schema) and ta.equals(tb)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,20000")
    ap.add_argument("--scratch", default="bench-out/embed_memory")
    ap.add_argument("--prepare-only", action="store_true", help="write the PNG stores only")
    ap.add_argument("--previous", default=None, help="checkout of the code to compare with")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    args.scratch = os.path.abspath(args.scratch)
    os.makedirs(args.scratch, exist_ok=True)
    manifests = {n: store(args.scratch, n) for n in sizes}
    if args.prepare_only:
        return {}
    results = {}
    codes = {"": REPO, **({"-previous": os.path.abspath(args.previous)}
                          if args.previous else {})}
    for n in sizes:
        for tag, code in codes.items():
            results[f"{n}{tag}"] = measure_size(args.scratch, manifests[n], n, code, tag)
            for what, m in results[f"{n}{tag}"].items():
                print(f"{what:>6}{tag} {n:>7,} images: {m['wall_s']:7.1f} s  "
                      f"{m['images_per_s']:7.0f} images/s  peak RSS "
                      f"{m['peak_rss_bytes'] / 2**30:5.2f} GiB", flush=True)
        if args.previous:
            same = same_features(*(os.path.join(args.scratch, f"features-{n}{t}")
                                   for t in codes))
            results[f"{n}_features_equal_previous"] = same
            print(f"features at {n:,} equal to the previous code's: {same}", flush=True)
    for tag in codes if len(sizes) > 1 else ():
        a, b = sizes[0], sizes[-1]
        for what in ("embed", "groups"):
            per = ((results[f"{b}{tag}"][what]["peak_rss_bytes"]
                    - results[f"{a}{tag}"][what]["peak_rss_bytes"]) / (b - a))
            results[f"{what}{tag}_bytes_per_image"] = round(per)
            print(f"{what}{tag}: peak RSS grows {per:,.0f} bytes an image from {a:,} to {b:,}")
    with open(os.path.join(args.scratch, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
