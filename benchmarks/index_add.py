"""``dn2 build-index --add`` against a fresh build of the union, for each index mode.

Synthetic 1280-d features (benchmarks/throughput.py's seeded Gaussian mixture,
written like ``dn2 embed``'s): N normal rows (the parent's features) and M more
(the added ones), and a union directory holding both. Per mode (flat, K-means,
IVF, HNSW), three ``dn2 build-index`` processes, each timed with its peak RSS by
/usr/bin/time: the parent from the N rows, a fresh build of the union, and
``--add`` of the M rows to the parent. Then 2000 held-out queries are scored by
both new indexes: max |score difference| (flat: exact, so ~float rounding; IVF and
HNSW: the recorded recall at work) and, for the approximate modes, the mean
excess over exact scores.

    flock /tmp/dn2-cpu.lock python benchmarks/index_add.py [--normal 100000] [--added 10000]
        [--modes flat,kmeans,ivf,hnsw] [--out bench-out/index_add]
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

from benchmarks.throughput import SEED, mixture, write_features  # noqa: E402

MODES = {"flat": ["--shards", "4"], "kmeans": ["--kmeans", "10"],
         "ivf": ["--ivf", "NLIST"], "hnsw": ["--hnsw", "32"]}
QUERIES = 2000


def timed(*args: str) -> dict:
    """One ``dn2`` process: wall seconds and peak RSS (bytes)."""
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "pipelines.cli", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    seconds, kib = done.stderr.strip().splitlines()[-1].split()[1:]
    return {"seconds": float(seconds), "peak_rss": int(kib) * 1024}


def split(union: str, out: str, n: int) -> tuple[str, str]:
    """Directories of the union's first feature shard (n rows) and of the rest, as
    committed features directories (the shard files hard-linked)."""
    with open(os.path.join(union, "_SUCCESS")) as f:
        marker = json.load(f)
    shards = sorted(p for p in os.listdir(union) if p.startswith("features-"))
    dirs = []
    for name, files in (("parent-features", shards[:1]), ("added-features", shards[1:])):
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        for s in files:
            if not os.path.exists(os.path.join(d, s)):
                os.link(os.path.join(union, s), os.path.join(d, s))
        with open(os.path.join(d, "_SUCCESS"), "w") as f:
            json.dump({**marker, "committed_files": [
                {"name": s, "size": os.path.getsize(os.path.join(d, s))} for s in files]}, f)
        dirs.append(d)
    return dirs[0], dirs[1]


def scores(index: str, xq: np.ndarray) -> np.ndarray:
    import torch  # noqa: F401  (before faiss: both bring OpenMP)

    from dn2ops.index import LoadedIndex

    return LoadedIndex(index, device="cpu").search(xq)[0]


def nlist(n: int) -> int:
    """IVF lists by faiss's rule of thumb, ~4 sqrt(n), as a power of two (1024 at 100k)."""
    return int(2 ** round(np.log2(4 * np.sqrt(n))))


def mode_row(out: str, mode: str, parent_feats: str, added: str, union: str,
             xq: np.ndarray, exact: np.ndarray | None, n: int) -> dict:
    idx = {w: os.path.join(out, f"{mode}-{w}") for w in ("parent", "fresh", "add")}
    flags = [str(nlist(n)) if f == "NLIST" else f for f in MODES[mode]]
    for d in idx.values():
        subprocess.run(["rm", "-rf", d], check=True)
    row = {"parent": timed("build-index", "--features", parent_feats, "--output",
                           idx["parent"], *flags)}
    row["fresh"] = timed("build-index", "--features", union, "--output", idx["fresh"], *flags)
    row["add"] = timed("build-index", "--add", added, "--index", idx["parent"], "--output",
                       idx["add"])
    s_fresh, s_add = scores(idx["fresh"], xq), scores(idx["add"], xq)
    row["max_abs_diff"] = float(np.abs(s_fresh - s_add).max())
    row["p99_abs_diff"] = float(np.quantile(np.abs(s_fresh - s_add), 0.99))
    row["time_ratio"] = round(row["add"]["seconds"] / row["fresh"]["seconds"], 3)
    with open(os.path.join(idx["add"], "_SUCCESS")) as f:
        manifest = json.load(f)
    info = manifest.get(mode if mode in ("ivf", "hnsw") else "kmeans") or {}
    if "recall" in info:
        row["recall_at_k"] = info["recall"]["recall_at_k"]
        row["parent_recall_at_k"] = info["recall"]["parent_recall_at_k"]
    row["reference_incremental"] = manifest["reference"].get("incremental")
    if "drift" in info:
        row["drift"] = info["drift"]
    if exact is not None and mode in ("ivf", "hnsw"):
        row["mean_excess_over_exact"] = {
            "fresh": float((s_fresh - exact).mean()), "add": float((s_add - exact).mean())}
        # Queries whose approximate score is the exact one (every true neighbour found).
        row["exact_fraction"] = {
            w: float(np.isclose(s, exact, rtol=1e-4, atol=1e-6).mean())
            for w, s in (("fresh", s_fresh), ("add", s_add))}
    print(f"{mode:>6}: fresh {row['fresh']['seconds']:7.1f} s "
          f"{row['fresh']['peak_rss'] / 2**30:5.2f} GiB | --add {row['add']['seconds']:7.1f} s "
          f"{row['add']['peak_rss'] / 2**30:5.2f} GiB | time ratio {row['time_ratio']:.3f} | "
          f"|score diff| max {row['max_abs_diff']:.3g} p99 {row['p99_abs_diff']:.3g}"
          + (f" | recall@2 {row['recall_at_k']}" if "recall_at_k" in row else "")
          + (" | scored exactly: fresh {fresh:.3f}, add {add:.3f}".format(
              **row["exact_fraction"]) if "exact_fraction" in row else "")
          + (f" | drift x{row['drift']['ratio']}" if "drift" in row else ""), flush=True)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--normal", type=int, default=100_000)
    p.add_argument("--added", type=int, default=10_000)
    p.add_argument("--modes", default="flat,kmeans,ivf,hnsw")
    p.add_argument("--out", default="bench-out/index_add")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    import benchmarks.throughput as tp

    tp.ROWS_PER_SHARD = args.normal  # shard 0: the parent's rows; shard 1: the added
    union = os.path.join(out, f"union-{args.normal}-{args.added}")
    write_features(union, args.normal + args.added, seed=SEED)
    parent_feats, added = split(union, out, args.normal)
    xq = next(mixture(QUERIES, SEED + 1))[:QUERIES]
    modes = args.modes.split(",")
    exact = None
    results = {"normal": args.normal, "added": args.added, "queries": len(xq), "modes": {}}
    for mode in (["flat"] if "flat" in modes else []) + [m for m in modes if m != "flat"]:
        results["modes"][mode] = mode_row(out, mode, parent_feats, added, union, xq, exact,
                                          args.normal)
        if mode == "flat":
            exact = scores(os.path.join(out, "flat-fresh"), xq)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
