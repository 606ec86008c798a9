"""``dn2 embed --reuse`` on a half-new directory, against a full embed of it.

Two workloads: phone-sized 12 MP JPEGs (made from scikit-learn's sample photos)
and Fashion-MNIST train PNGs. For N images of each, an earlier features
directory holds images 0..N-1; the half-new directory holds images N/2..3N/2-1
(half of them known). It is embedded twice, each run its own ``dn2 embed``
process under ``/usr/bin/time -v``: in full, and with ``--reuse`` the earlier
directory. Printed side by side: wall time, peak RSS, images embedded and
copied (from the features marker), and the ratio of the wall times; the two
outputs' features are compared row by row (max |diff|). A third run reuses the
earlier directory for its own images (all known): the cost of --reuse besides
embedding (start-up, reading and hashing, the copy).

    flock /tmp/dn2-cpu.lock python benchmarks/embed_reuse.py [--photos 384] [--pngs 4000]
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

import numpy as np  # noqa: E402

from benchmarks.datasets import (  # noqa: E402
    load_fashion_mnist,
    write_manifest,
    write_photo_store,
    write_png_store,
)
from benchmarks.score_memory import measure  # noqa: E402


def manifests(out: str, name: str, paths: list[str]) -> tuple[str, str]:
    """(earlier manifest: images 0..N-1, half-new manifest: images N/2..3N/2-1) of 3N/2 paths."""
    n = len(paths) * 2 // 3
    earlier, half = (os.path.join(out, f"{name}-{w}.csv") for w in ("earlier", "half"))
    write_manifest([{"uri": p} for p in paths[:n]], earlier)
    write_manifest([{"uri": p} for p in paths[n // 2:]], half)
    return earlier, half


def embed(manifest: str, output: str, *extra: str) -> dict:
    subprocess.run(["rm", "-rf", output], check=True)
    m = measure([sys.executable, "-m", "pipelines.cli", "embed", "--input", manifest,
                 "--output", output, "--device", "cpu", *extra], REPO)
    with open(os.path.join(output, "_SUCCESS")) as f:
        marker = json.load(f)
    reused = marker.get("reused", {}).get("images", 0)
    return {**m, "count_in": marker["count_in"], "copied": reused,
            "embedded": marker["embedded"] - reused, "errored": marker["errored"]}


def max_diff(a: str, b: str) -> float:
    from dn2ops.io.features import load_features

    (ta, xa, _), (tb, xb, _) = load_features(a), load_features(b)
    ia = {u: i for i, u in enumerate(ta.column("uri").to_pylist())}
    order = [ia[u] for u in tb.column("uri").to_pylist()]
    return float(np.abs(xa[order] - xb).max())


def workload(out: str, name: str, paths: list[str]) -> dict:
    earlier_csv, half_csv = manifests(out, name, paths)
    earlier = os.path.join(out, f"{name}-earlier")
    res = {"earlier": embed(earlier_csv, earlier)}
    res["full"] = embed(half_csv, os.path.join(out, f"{name}-full"))
    res["reuse"] = embed(half_csv, os.path.join(out, f"{name}-reuse"), "--reuse", earlier)
    # Every image known: what --reuse costs beside the embedding (start, hashing, copy).
    res["all_known"] = embed(earlier_csv, os.path.join(out, f"{name}-all-known"), "--reuse",
                             earlier)
    res["time_ratio"] = round(res["reuse"]["wall_s"] / res["full"]["wall_s"], 3)
    res["max_abs_diff"] = max_diff(os.path.join(out, f"{name}-full"),
                                   os.path.join(out, f"{name}-reuse"))
    for way in ("full", "reuse", "all_known"):
        m = res[way]
        print(f"{name:>6} {way:>9}: {m['count_in']:>6,} images, {m['embedded']:>6,} embedded, "
              f"{m['copied']:>6,} copied, {m['wall_s']:7.1f} s, peak RSS "
              f"{m['peak_rss_bytes'] / 2**30:5.2f} GiB", flush=True)
    print(f"{name:>6} --reuse / full wall time: {res['time_ratio']:.3f}; features max |diff| "
          f"{res['max_abs_diff']:.3g}", flush=True)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=384, help="N for the photos (0: skip)")
    ap.add_argument("--pngs", type=int, default=4000, help="N for Fashion-MNIST (0: skip)")
    ap.add_argument("--out", default="bench-out/embed_reuse")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    results = {}
    if args.photos:
        paths = write_photo_store(os.path.join(out, "photos"), args.photos * 3 // 2, workers=2)
        results["photos"] = workload(out, "photos", paths)
    if args.pngs:
        n = args.pngs * 3 // 2
        images, _ = load_fashion_mnist(split="train")
        paths = write_png_store(images[:n], [f"train-{i:05d}" for i in range(n)],
                                os.path.join(out, "png"))
        results["pngs"] = workload(out, "pngs", paths)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
