"""`dn2 build-index` as the normal set grows: the bounded percentile reference (the
default, leave-one-out scores of 20,000 sampled images) against exact leave-one-out over
every image (the old default, ``--reference-sample all``), in one run.

Every build is a whole ``dn2 build-index --shards 4`` process on synthetic 1280-d
feature shards (benchmarks/throughput.py's seeded Gaussian mixture, written like
``dn2 embed``'s), timed with its peak RSS by /usr/bin/time. The old default costs n^2 d:
it is measured at ``--exact-sizes`` and extrapolated to ``--sizes`` with
t = a + b n^2 fitted to those points (the table says which figures are extrapolated).
At the largest exact size, both references are built on the same features, and the
largest difference between the percentiles they give (the Kolmogorov distance between
the sampled and the full leave-one-out scores) is printed beside the manifest's bound.

    python benchmarks/build_scale.py [--sizes 200000,1000000] [--exact-sizes 25000,50000]
        [--out bench-out/build_scale]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.throughput import SEED, write_features  # noqa: E402

SHARDS = 4


def build(features: str, index: str, *extra: str) -> dict:
    """One ``dn2 build-index`` process: wall seconds, peak RSS (bytes) and its manifest."""
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "pipelines.cli",
           "build-index", "--features", features, "--output", index,
           "--shards", str(SHARDS), *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    seconds, kib = done.stderr.strip().splitlines()[-1].split()[1:]
    with open(os.path.join(index, "_SUCCESS")) as f:
        manifest = json.load(f)
    return {"seconds": float(seconds), "peak_rss": int(kib) * 1024,
            "reference": manifest["reference"]}


def loo_scores(index: str) -> np.ndarray:
    import pyarrow.parquet as pq

    loo = pq.read_table(os.path.join(index, "normal.parquet"), columns=["loo_score"])
    x = loo.column(0).to_numpy()
    return np.sort(x[np.isfinite(x)])


def kolmogorov(a: np.ndarray, b: np.ndarray) -> float:
    """max over x of |F_a(x) - F_b(x)| for sorted samples a, b, in percentile points."""
    at = np.concatenate([a, b])
    gaps = [np.abs(np.searchsorted(a, at, side) / len(a) - np.searchsorted(b, at, side) / len(b))
            for side in ("left", "right")]
    return 100.0 * float(max(g.max() for g in gaps))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="200000,1000000")
    p.add_argument("--exact-sizes", default="25000,50000")
    p.add_argument("--out", default="bench-out/build_scale")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    exact_sizes = [int(s) for s in args.exact_sizes.split(",")]
    rows: dict[int, dict] = {}
    for n in sorted(set(sizes + exact_sizes)):
        feats = os.path.join(args.out, f"features-{n}")
        write_features(feats, n, seed=SEED + n)
        if os.path.exists(feats + ".npy"):
            os.remove(feats + ".npy")  # throughput.py's copy for its baselines: not needed
        rows[n] = {"default": build(feats, os.path.join(args.out, f"index-{n}"))}
        if n in exact_sizes:
            rows[n]["exact"] = build(feats, os.path.join(args.out, f"index-{n}-all"),
                                     "--reference-sample", "all")
        print(f"N={n}: " + json.dumps(rows[n]), flush=True)
    ns = np.array(exact_sizes, float)
    b, a = np.polyfit(ns ** 2, [rows[n]["exact"]["seconds"] for n in exact_sizes], 1)
    print("\n| N | default (20k sample): s | peak RSS GiB | exact leave-one-out: s "
          "| peak RSS GiB | exact / default |")
    print("|---|---|---|---|---|---|")
    for n in sorted(rows):
        d = rows[n]["default"]
        if "exact" in rows[n]:
            e = rows[n]["exact"]
            e_txt, m_txt = f"{e['seconds']:.1f}", f"{e['peak_rss'] / 2**30:.2f}"
            ratio = e["seconds"] / d["seconds"]
        else:
            est = a + b * n ** 2
            e_txt, m_txt, ratio = f"~{est:.0f} (extrapolated)", "-", est / d["seconds"]
        print(f"| {n:,} | {d['seconds']:.1f} | {d['peak_rss'] / 2**30:.2f} | {e_txt} "
              f"| {m_txt} | {ratio:.1f}x |")
    print(f"\nexact fit: t = {a:.1f} s + {b:.3e} s x N^2 (from N = {exact_sizes})")
    n = max(exact_sizes)
    dist = kolmogorov(loo_scores(os.path.join(args.out, f"index-{n}")),
                      loo_scores(os.path.join(args.out, f"index-{n}-all")))
    bound = rows[n]["default"]["reference"]["percentile_error"]
    print(f"N={n:,}: largest percentile difference, 20k sample vs every image: {dist:.3f} "
          f"points (recorded 95 % bound {bound} points)")
    result = {"rows": rows, "fit": {"a": a, "b": b}, "kolmogorov_points": dist}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    return result


if __name__ == "__main__":
    main()
