"""Peak memory and speed of group-mode scoring (``dn2 score --group-by``) as images grow.

Synthetic 1280-d float32 features (`benchmarks.score_memory`'s seeded mixture, written
like ``dn2 embed``'s shards with a manifest column ``lot``: 20 images a lot, lots in
order) are scored as sets, each size as its own ``dn2 score`` process under
``/usr/bin/time -v``: wall time, peak RSS, images/s, in two modes:

* ``covtrace``: ``--group-score covtrace`` (no index);
* ``knn-mean``: ``--pool mean`` against an index of 1000 normal lots
  (``dn2 build-index --group-by lot``, 20k normal rows).

The written groups table is checked against numpy on a sample of lots recomputed from
the raw features: covtrace = trace of ``np.cov``; knn-mean = mean distance from the
lot's mean feature to its 2 nearest normal lot means (brute force); rank = 1 + the
number of strictly higher scores over all lots.

With ``--previous PATH`` (a checkout of the code before) the sizes up to
``--previous-max`` are also scored by that code, side by side: its peak RSS and
whether its table is the same (max |score difference|, ranks equal).

    flock /tmp/dn2-cpu.lock python benchmarks/group_memory.py \\
        [--sizes 20000,100000,300000] [--previous ../base] [--scratch DIR]

Results: --scratch/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
    sys.path.insert(0, REPO)

from benchmarks import score_memory  # noqa: E402
from benchmarks.score_memory import DIM, ROWS_PER_SHARD, measure  # noqa: E402
from dn2ops.io import features, outputs  # noqa: E402

LOT = 20  # images a lot
NORMAL = 20_000
K = 2
SAMPLE = 200  # lots checked against numpy at each size
MODES = ("covtrace", "knn-mean")


def lot_of(i: int) -> str:
    return f"lot{i // LOT:07d}"


def write_features(directory: str, n: int, seed: int) -> None:
    """A committed features directory of n synthetic rows with a ``lot`` column."""
    score_memory.write_features(directory, n, seed, {"lot": lot_of})


def score(dn2: list[str], mode: str, feats: str, index: str, out: str, code: str) -> dict:
    subprocess.run(["rm", "-rf", out], check=True)
    how = (["--group-score", "covtrace"] if mode == "covtrace"
           else ["--pool", "mean", "--index", index])
    return measure([*dn2, "score", "--features", feats, "--group-by", "lot", *how,
                    "--output", out], code)


def read_groups(out: str) -> pa.Table:
    return features.read_table(out, "groups", columns=["group", "score", "rank", "size"]
                               ).sort_by("group")


def _lot_features(feats: str, lots: np.ndarray) -> list[np.ndarray]:
    """The raw features (LOT, DIM) of each lot number in lots (sorted), float64."""
    paths = features.shard_paths(feats, "features")
    rows = (lots[:, None] * LOT + np.arange(LOT)[None]).ravel()
    shard_of = rows // ROWS_PER_SHARD
    x = np.concatenate([
        features.embeddings(pq.read_table(paths[s], columns=["embedding"]).take(
            rows[shard_of == s] % ROWS_PER_SHARD)) for s in np.unique(shard_of)])
    return list(x.astype(np.float64).reshape(len(lots), LOT, DIM))


def normal_means(normal: str) -> np.ndarray:
    return np.stack([x.mean(0) for x in _lot_features(normal, np.arange(NORMAL // LOT))])


def check_against_numpy(table: pa.Table, mode: str, feats: str, n: int,
                        normal: np.ndarray) -> dict:
    rng = np.random.default_rng(0)
    lots = np.sort(rng.choice(n // LOT, size=min(SAMPLE, n // LOT), replace=False))
    xs = _lot_features(feats, lots)
    if mode == "covtrace":
        want = np.array([np.trace(np.cov(x, rowvar=False)) for x in xs])
    else:
        q = np.stack([x.mean(0) for x in xs])
        d = np.sqrt(((q[:, None, :] - normal[None]) ** 2).sum(-1))
        want = np.sort(d, axis=1)[:, :K].mean(1)
    names = table.column("group").to_numpy(zero_copy_only=False)
    got = table.take(np.searchsorted(names, [lot_of(int(g) * LOT) for g in lots]))
    assert got.column("group").to_pylist() == [lot_of(int(g) * LOT) for g in lots]
    all_scores = table.column("score").to_numpy()
    scores = got.column("score").to_numpy()
    ranks = np.array([1 + int((all_scores > s).sum()) for s in scores])
    return {"groups_written": table.num_rows, "groups_checked": len(lots),
            "max_rel_score_diff_vs_numpy": float(np.abs(scores - want).max()
                                                 / np.abs(want).max()),
            "ranks_equal_brute_force": bool((got.column("rank").to_numpy() == ranks).all()),
            "sizes_all_20": bool((table.column("size").to_numpy() == LOT).all())}


def compare(a: pa.Table, b: pa.Table) -> dict:
    assert a.column("group").equals(b.column("group"))
    sa, sb = a.column("score").to_numpy(), b.column("score").to_numpy()
    return {"max_rel_score_diff": float(np.abs(sa - sb).max() / np.abs(sb).max()),
            "ranks_equal": a.column("rank").equals(b.column("rank"))}


def _line(what: str, n: int, r: dict) -> str:
    extra = "".join(f"  {k} {v}" for k, v in r.items()
                    if k not in ("wall_s", "peak_rss_bytes", "images_per_s"))
    return (f"{what:<22} {n:>9,} images: {r['wall_s']:7.1f} s  {r['images_per_s']:7.0f} "
            f"images/s  peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB{extra}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20000,100000,300000")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--scratch", default="bench-out/group_memory")
    ap.add_argument("--previous", default=None, help="checkout of the code to compare with")
    ap.add_argument("--previous-max", type=int, default=100_000,
                    help="largest size also run by --previous")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    scratch = os.path.abspath(args.scratch)
    os.makedirs(scratch, exist_ok=True)
    dn2 = [sys.executable, "-m", "pipelines.cli"]
    normal = os.path.join(scratch, "normal")
    index = os.path.join(scratch, "index-lots")
    write_features(normal, NORMAL, seed=1)
    if "knn-mean" in modes and outputs.read_marker(index) is None:
        subprocess.run([*dn2, "build-index", "--features", normal, "--output", index,
                        "--group-by", "lot", "--pool", "mean"], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
    means = normal_means(normal) if "knn-mean" in modes else None
    results: dict = {"lot": LOT, "modes": {}}
    for mode in modes:
        res = results["modes"][mode] = {}
        for n in sizes:
            feats = os.path.join(scratch, f"q{n}")
            write_features(feats, n, seed=2)
            out = os.path.join(scratch, f"{mode}-{n}")
            r = score(dn2, mode, feats, index, out, REPO)
            r["images_per_s"] = round(n / r["wall_s"], 1)
            mine = read_groups(out)
            r.update(check_against_numpy(mine, mode, feats, n, means))
            res[n] = {"now": r}
            print(_line(f"{mode}, now", n, r), flush=True)
            if args.previous and n <= args.previous_max:
                p = score(dn2, mode, feats, index, out + "-previous",
                          os.path.abspath(args.previous))
                p["images_per_s"] = round(n / p["wall_s"], 1)
                p.update(compare(mine, read_groups(out + "-previous")))
                res[n]["previous"] = p
                print(_line(f"{mode}, previous", n, p), flush=True)
        for who in ("now", "previous"):
            got = [(n, res[n][who]["peak_rss_bytes"]) for n in sizes if who in res[n]]
            if len(got) > 1:
                (n0, r0), (n1, r1) = got[0], got[-1]
                per = (r1 - r0) / (n1 - n0)
                res[f"{who}_bytes_per_image"] = round(per)
                print(f"{mode}, {who}: peak RSS {n0:,} -> {n1:,}: +{per / 1024:.2f} KB an "
                      f"image, ratio {r1 / r0:.2f}", flush=True)
    with open(os.path.join(scratch, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
