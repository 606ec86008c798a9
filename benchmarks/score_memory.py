"""Peak memory and speed of ``dn2 score --features`` as the number of images grows.

Synthetic 1280-d float32 query features (a seeded mixture of 10 clusters, written
like ``dn2 embed``'s shards: 100k rows a shard, a committed ``_SUCCESS``) are scored
against a small index (K-means C=10 over 20k normal rows, so the search costs
almost nothing and the figures are dn2's own overhead). Each size runs as its own
``dn2 score`` process under ``/usr/bin/time -v``: wall time, peak RSS (maximum
resident set size), images/s. The written table is checked against brute force
numpy on a sample of rows: score = distance to the nearest centre, rank = 1 + the
number of strictly higher scores over all rows.

With ``--previous PATH`` (a checkout of the code before, e.g. a git worktree) the
first size is also scored by that code: its peak RSS, and whether its table is the
same as this code's (max |score difference|, ranks equal).

    flock /tmp/dn2-cpu.lock python benchmarks/score_memory.py \\
        [--sizes 100000,300000,1000000] [--previous ../base] [--scratch DIR]

The 1M features take about 5 GB in --scratch (reused when present; the smaller
sizes are hard links to its first shards). Results: --scratch/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
    sys.path.insert(0, REPO)

from dn2ops.embed.backbones import get_spec  # noqa: E402
from dn2ops.io import features, outputs  # noqa: E402

DIM = 1280
ROWS_PER_SHARD = 100_000
NORMAL = 20_000
KMEANS_C = 10
SAMPLE = 2_000  # rows checked against brute force at each size
SEED = 19
Extra = Mapping[str, Callable[[int], str]]  # manifest column -> its value for row i
NO_EXTRA: Extra = MappingProxyType({})


def mixture(n: int, seed: int, block: int = 50_000):
    """float32 blocks (m, DIM): 10 cluster centres (fixed) plus isotropic noise."""
    centres = np.random.default_rng(SEED).normal(0, 1, (10, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    for a in range(0, n, block):
        m = min(block, n - a)
        x = rng.standard_normal((m, DIM), dtype=np.float32)
        x *= 0.3
        x += centres[rng.integers(0, 10, m)]
        yield x


def _shard(x: np.ndarray, start: int, extra: Extra) -> pa.Table:
    ids = range(start, start + len(x))
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)
    return pa.table({"uri": [f"synthetic://{i:07d}" for i in ids],
                     "sha256": [f"{i:064x}" for i in ids],
                     "backbone": ["efficientnet_lite0"] * len(x), "dim": [DIM] * len(x),
                     "embedding": emb.cast(pa.list_(pa.float32())),
                     **{c: [value(i) for i in ids] for c, value in extra.items()}},
                    schema=features.feature_schema(list(extra)))


def _commit(staging: str, directory: str, n: int, what: str, extra: Extra = NO_EXTRA) -> None:
    outputs.commit(staging, directory, {
        "kind": features.KIND, **get_spec("efficientnet_lite0").metadata(), "input": what,
        "count_in": n, "embedded": n, "errored": 0, "extra_columns": list(extra)})


def write_features(directory: str, n: int, seed: int, extra: Extra = NO_EXTRA) -> None:
    """A committed features directory of n synthetic rows, ROWS_PER_SHARD a shard; ``extra``
    names manifest columns and the value of each for a row number."""
    if outputs.read_marker(directory) is not None:
        return
    staging = outputs.new_staging(directory)
    os.makedirs(staging)
    shards = -(-n // ROWS_PER_SHARD)
    done = 0
    for s in range(shards):
        m = min(ROWS_PER_SHARD, n - done)
        x = np.concatenate(list(mixture(m, seed * 1000 + s)))
        pq.write_table(_shard(x, done, extra), os.path.join(
            staging, f"features-{s:05d}-of-{shards:05d}.parquet"), compression="NONE")
        done += m
    _commit(staging, directory, n, f"synthetic mixture seed {seed}", extra)


def link_features(src: str, directory: str, n: int) -> None:
    """The first n rows of src (whole shards) as their own committed directory, hard links."""
    if outputs.read_marker(directory) is not None:
        return
    staging = outputs.new_staging(directory)
    os.makedirs(staging)
    shards = n // ROWS_PER_SHARD
    for s, name in enumerate(features.shard_paths(src, "features")[:shards]):
        os.link(name, os.path.join(staging, f"features-{s:05d}-of-{shards:05d}.parquet"))
    _commit(staging, directory, n, f"first {n} rows of {src}")


def measure(cmd: list[str], pythonpath: str) -> dict:
    """Runs cmd under /usr/bin/time -v: wall seconds and peak RSS (bytes)."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    t0 = time.perf_counter()
    # cwd too: ``python -m`` puts the working directory first on sys.path, before PYTHONPATH
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True,
                         text=True, cwd=pythonpath)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return {"wall_s": round(wall, 2), "peak_rss_bytes": rss * 1024}


def score(dn2: list[str], feats: str, index: str, out: str, pythonpath: str) -> dict:
    if os.path.exists(out):
        subprocess.run(["rm", "-rf", out], check=True)
    return measure([*dn2, "score", "--features", feats, "--index", index, "--output", out,
                    "--top", "20"], pythonpath)


def read_results(out: str) -> pa.Table:
    t = features.read_table(out, "anomalies", columns=["uri", "score", "rank", "percentile"])
    return t.sort_by("uri")


_POWERS = {"none": None, "l2": 1.0, "sqrt-l2": 0.5, "root4-l2": 0.25}


def _transformed(x: np.ndarray, name: str) -> np.ndarray:
    """The index's feature transform, in float64 by hand: signed power, unit length."""
    x = x.astype(np.float64)
    if _POWERS[name] is None:
        return x
    x = np.sign(x) * np.abs(x) ** _POWERS[name]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def check_against_brute_force(table: pa.Table, feats: str, index: str, n: int) -> dict:
    """Scores and ranks of SAMPLE rows recomputed with numpy from the raw features (put
    through the index's feature transform, by hand) and the index's K-means centres."""
    from dn2ops.index import LoadedIndex

    loaded = LoadedIndex(index)
    centres = loaded.centroids.astype(np.float64)
    transform = loaded.manifest.get("feature_transform", "none")
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n, size=min(SAMPLE, n), replace=False))
    shard_of = rows // ROWS_PER_SHARD
    paths = features.shard_paths(feats, "features")
    xq = np.concatenate([
        features.embeddings(pq.read_table(paths[s], columns=["embedding"]).take(
            rows[shard_of == s] % ROWS_PER_SHARD)) for s in np.unique(shard_of)])
    xq = _transformed(xq, transform)
    d = np.sqrt(((xq[:, None, :] - centres[None]) ** 2).sum(-1)).min(1)
    uris = [f"synthetic://{i:07d}" for i in rows]
    got = table.take(np.searchsorted(table.column("uri").to_numpy(zero_copy_only=False),
                                     uris))
    assert got.column("uri").to_pylist() == uris
    all_scores = table.column("score").to_numpy()
    got_scores = got.column("score").to_numpy()
    expected_rank = np.array([1 + int((all_scores > s).sum()) for s in got_scores])
    return {"rows_checked": len(rows), "rows_written": table.num_rows,
            "max_abs_score_diff_vs_numpy": float(np.abs(got_scores - d).max()),
            "ranks_equal_brute_force": bool((got.column("rank").to_numpy()
                                              == expected_rank).all())}


def compare(a: pa.Table, b: pa.Table) -> dict:
    assert a.column("uri").equals(b.column("uri"))
    return {"max_abs_score_diff": float(np.abs(a.column("score").to_numpy()
                                               - b.column("score").to_numpy()).max()),
            "ranks_equal": a.column("rank").equals(b.column("rank")),
            "percentiles_equal": a.column("percentile").equals(b.column("percentile"))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,300000,1000000")
    ap.add_argument("--scratch", default="bench-out/score_memory")
    ap.add_argument("--previous", default=None, help="checkout of the code to compare with")
    ap.add_argument("--prepare-only", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    args.scratch = os.path.abspath(args.scratch)
    os.makedirs(args.scratch, exist_ok=True)
    dn2 = [sys.executable, "-m", "pipelines.cli"]
    normal = os.path.join(args.scratch, "normal")
    index = os.path.join(args.scratch, "index-kmeans10")
    write_features(normal, NORMAL, seed=1)
    if outputs.read_marker(index) is None:
        subprocess.run([*dn2, "build-index", "--features", normal, "--output", index,
                        "--kmeans", str(KMEANS_C)], check=True, env={**os.environ,
                                                                     "PYTHONPATH": REPO})
    biggest = os.path.join(args.scratch, f"q{max(sizes)}")
    write_features(biggest, max(sizes), seed=2)
    dirs = {n: biggest if n == max(sizes) else os.path.join(args.scratch, f"q{n}")
            for n in sizes}
    for n, d in dirs.items():
        link_features(biggest, d, n)
    if args.prepare_only:
        return {}
    results = {"sizes": {}, "previous": None}
    for n in sizes:
        out = os.path.join(args.scratch, f"results-{n}")
        r = score(dn2, dirs[n], index, out, REPO)
        r["images_per_s"] = round(n / r["wall_s"], 1)
        r.update(check_against_brute_force(read_results(out), dirs[n], index, n))
        results["sizes"][n] = r
        print(f"{n:>9,} images: {r['wall_s']:7.1f} s  {r['images_per_s']:8.0f} images/s  "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB  max |score - numpy| "
              f"{r['max_abs_score_diff_vs_numpy']:.2e}  ranks ok "
              f"{r['ranks_equal_brute_force']}", flush=True)
    n0 = sizes[0]
    if args.previous:
        out = os.path.join(args.scratch, f"results-{n0}-previous")
        r = score(dn2, dirs[n0], index, out, os.path.abspath(args.previous))
        r["images_per_s"] = round(n0 / r["wall_s"], 1)
        r.update(compare(read_results(os.path.join(args.scratch, f"results-{n0}")),
                         read_results(out)))
        results["previous"] = {"n": n0, **r}
        print(f"previous code at {n0:,}: {r['wall_s']:.1f} s  peak RSS "
              f"{r['peak_rss_bytes'] / 2**30:.2f} GiB; same table: max |score diff| "
              f"{r['max_abs_score_diff']:.1e}, ranks equal {r['ranks_equal']}, "
              f"percentiles equal {r['percentiles_equal']}", flush=True)
    if len(sizes) > 1:
        big, small = results["sizes"][sizes[-1]], results["sizes"][n0]
        results["rss_ratio"] = round(big["peak_rss_bytes"] / small["peak_rss_bytes"], 3)
        print(f"peak RSS {sizes[-1]:,} / {n0:,}: {results['rss_ratio']:.2f} (goal <= 1.2); "
              f"{sizes[-1]:,}: {big['peak_rss_bytes'] / 2**30:.2f} GiB (goal <= 4)")
    with open(os.path.join(args.scratch, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
