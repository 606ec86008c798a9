"""Throughput and memory at scale, measured side by side in one run.

(a) embedding images/s, each way timed as a whole process, side by side
    (benchmarks/embed_workloads.py): ``dn2 embed``, a bare loop with the fastest
    decode and engine, and dn2's previous path (``--engine torch --decode full``),
    on N >= 256 phone-sized 12 MP JPEGs made from real photos and on the
    Fashion-MNIST test PNGs;
(b) scoring queries/s at N = 10k, 100k, 1M normal features (synthetic 1280-d
    float32, a seeded Gaussian mixture with a low-dimensional spread per
    cluster, written as real feature shards of 100k rows so every build
    streams from disk): dn2 exact (flat shards held in memory, and streamed
    shard by shard), bare faiss IndexFlatL2, dn2 K-means C=10, dn2 IVF-Flat in
    memory and with --ondisk inverted lists (nlist ~ 4 sqrt(N), nprobe tuned at
    build time to recall@2 >= 0.95), dn2 HNSW (M 32, efSearch tuned likewise),
    and scikit-learn's
    ``NearestNeighbors(algorithm='brute')`` (what PyOD's KNN detector fits), and
    PyOD's KNN scoring path itself (``decision_function`` queries a sklearn
    BallTree one sample at a time) at N <= 100k;
(c) peak memory (VmHWM, the peak RSS) of every build and every scoring, each
    run in a fresh subprocess (tracemalloc would not see faiss's C++
    allocations, and ru_maxrss inherits the parent's size across fork+exec);
(d) how time and memory grow with N: a table, fitted log-log slopes and a
    log-log PNG plot.

    nice -n 5 python benchmarks/throughput.py [--skip-embed | --embed-only]
        [--photos DIR] [--photo-images 256] [--embed-images 2000]
        [--sizes 10000,100000,1000000]

Outputs in --out (default bench-out/throughput): results.json, table.md,
scaling.png, the image store and the synthetic feature directories (reused
when present).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: benchmarks.embed_workloads is imported
    sys.path.insert(0, REPO)

DIM = 1280
ROWS_PER_SHARD = 100_000
K = 2
KMEANS_C = 10
HNSW_M = 32
REFERENCE_SAMPLE = 200  # percentile reference: exact leave-one-out of this many rows
RECALL_QUERIES = 200  # IVF recall@2 is measured on this many sampled normal rows
PYOD_QUERIES = 50  # PyOD's KNN scores one sample at a time: slow, so fewer queries
PYOD_MAX = 100_000
SEED = 20260


def ivf_lists(n: int) -> int:
    """faiss's rule of thumb, nlist ~ 4 sqrt(N) (as a power of two), with >= 64 vectors a
    list on average: 10k -> 128, 100k -> 1024, 1M -> 4096."""
    return int(2 ** round(math.log2(max(16, min(4 * math.sqrt(n), n / 64)))))


# -- synthetic normal features -------------------------------------------------


def mixture(n: int, seed: int, block: int = 50_000):
    """Yields float32 blocks of a Gaussian mixture in DIM-d: 100 clusters, each spread
    along its own 32-d subspace plus small isotropic noise, offset from 0 like CNN features."""
    model = np.random.default_rng(SEED)
    centers = model.normal(0, 1.0, (100, DIM)).astype(np.float32) + 1.0
    bases = model.normal(0, 0.05, (100, 32, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    for a in range(0, n, block):
        m = min(block, n - a)
        c = rng.integers(0, 100, m)
        z = rng.standard_normal((m, 32), dtype=np.float32)
        x = centers[c]  # fancy indexing copies
        for j in np.unique(c):  # per-cluster matmul: fast and exact
            sel = c == j
            x[sel] += z[sel] @ bases[j]
        x += rng.normal(0, 0.05, (m, DIM)).astype(np.float32)
        yield x


def write_features(directory: str, n: int, seed: int) -> None:
    """A committed dn2 features directory of n synthetic rows, ROWS_PER_SHARD per shard,
    plus the same rows as ``directory + '.npy'`` for the non-dn2 baselines to load quickly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dn2ops.embed.backbones import get_spec
    from dn2ops.io import features

    if os.path.exists(os.path.join(directory, "_SUCCESS")):
        return
    os.makedirs(directory, exist_ok=True)
    shards = math.ceil(n / ROWS_PER_SHARD)
    flat = np.lib.format.open_memmap(directory + ".npy", mode="w+", dtype=np.float32,
                                     shape=(n, DIM))
    buf, s, done = [], 0, 0
    for block in mixture(n, seed):
        buf.append(block)
        have = sum(len(b) for b in buf)
        while have >= ROWS_PER_SHARD or (done + have == n and have):
            x = np.concatenate(buf)
            take = min(ROWS_PER_SHARD, len(x))
            part, rest = x[:take], x[take:]
            ids = range(done, done + take)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(part.ravel()), DIM)
            table = pa.table({"uri": [f"synthetic://{i:07d}" for i in ids],
                              "sha256": [f"{i:064x}" for i in ids],
                              "backbone": ["efficientnet_lite0"] * take, "dim": [DIM] * take,
                              "embedding": emb.cast(pa.list_(pa.float32()))},
                             schema=features.feature_schema())
            pq.write_table(table, os.path.join(
                directory, f"features-{s:05d}-of-{shards:05d}.parquet"), compression="NONE")
            flat[done:done + take] = part
            s, done = s + 1, done + take
            buf = [rest] if len(rest) else []
            have = len(rest)
    marker = {"kind": "features", **get_spec("efficientnet_lite0").metadata(),
              "input": f"synthetic mixture seed {seed}", "count_in": n, "embedded": n,
              "errored": 0}
    flat.flush()
    del flat
    with open(os.path.join(directory, "_SUCCESS"), "w") as f:
        json.dump(marker, f)


def read_all(directory: str) -> np.ndarray:
    """The n x DIM features in memory (a plain read of the .npy copy, not a memory map)."""
    return np.load(directory + ".npy")


# -- one configuration per subprocess ------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_now() -> int:
    return _status("VmRSS")


def peak_rss() -> int:
    """Peak RSS of this process's own address space (VmHWM, reset by exec).

    Not getrusage's ru_maxrss: Linux folds the pre-exec RSS of the forking
    parent into the child's ru_maxrss, so every worker would report at least
    the parent's size.
    """
    return _status("VmHWM")


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs one task; returns its figures plus peak RSS (ru_maxrss) and the post-import RSS."""
    # Import what the task needs before the baseline RSS is taken.
    task = cfg["task"]
    if task in ("build", "score"):
        import faiss  # noqa: F401

        from dn2ops.config import IndexConfig
        from dn2ops.index import LoadedIndex, build_index
    if cfg.get("method") in ("sklearn", "pyod-balltree"):
        import sklearn.neighbors  # noqa: F401

    out: dict[str, Any] = {}
    base = rss_now()
    t0 = time.perf_counter()
    if task == "build":
        kw: dict[str, Any] = {"k": K, "shards": math.ceil(cfg["n"] / ROWS_PER_SHARD),
                              "reference_sample": REFERENCE_SAMPLE,
                              "recall_queries": RECALL_QUERIES}
        if cfg["method"] == "kmeans":
            kw["n_centroids"] = KMEANS_C
        elif cfg["method"] in ("ivf", "ivf-ondisk"):
            kw["ivf_lists"] = ivf_lists(cfg["n"])
            kw["ondisk"] = cfg["method"] == "ivf-ondisk"
        elif cfg["method"] == "hnsw":
            kw["hnsw_m"] = HNSW_M
        manifest = build_index(cfg["features"], cfg["index"], IndexConfig(**kw), device="cpu")
        out["seconds"] = time.perf_counter() - t0
        out["index_bytes"] = dir_bytes(cfg["index"])
        out["largest_feature_shard_bytes"] = min(cfg["n"], ROWS_PER_SHARD) * DIM * 4
        out["ivf"] = manifest.get("ivf")
        out["hnsw"] = manifest.get("hnsw")
    elif task == "score":
        xq = np.load(cfg["queries"])[: cfg["nq"]]
        if cfg["method"] == "sklearn":
            from sklearn.neighbors import NearestNeighbors

            X = read_all(cfg["features"])
            t1 = time.perf_counter()
            nn = NearestNeighbors(n_neighbors=K, algorithm="brute").fit(X)
            out["load_seconds"] = time.perf_counter() - t0
            out["fit_seconds"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            D, _ = nn.kneighbors(xq)
        elif cfg["method"] == "pyod-balltree":
            from sklearn.neighbors import BallTree

            tree = BallTree(read_all(cfg["features"]), leaf_size=30)  # PyOD KNN's defaults
            out["load_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            D = np.concatenate([tree.query(x[None], k=K)[0] for x in xq])  # as PyOD: one by one
        elif cfg["method"] == "faiss-bare":
            import faiss

            index = faiss.IndexFlatL2(DIM)
            index.add(read_all(cfg["features"]))
            out["load_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            D2, _ = index.search(xq, K)
            D = np.sqrt(np.maximum(D2, 0))
        else:
            loaded = LoadedIndex(cfg["index"], device="cpu",
                                 stream_shards=cfg["method"] == "flat-stream")
            out["load_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            _, D, _ = loaded.search(xq)
            if D.shape[1] == 0:  # K-means: the score is the centre distance
                D = loaded.search(xq[:1])[0][:, None]
        out["search_seconds"] = time.perf_counter() - t1
        out["queries"] = int(len(xq))
        out["qps"] = len(xq) / out["search_seconds"]
        out["mean_score"] = float(np.mean(D))
        if cfg.get("save_ids"):
            np.save(cfg["save_ids"], D.mean(axis=1))
    else:
        raise ValueError(task)
    out["peak_rss"] = peak_rss()
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["baseline_rss"] = base
    return out


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**cfg, **json.loads(line[7:])}
    raise RuntimeError(f"worker {cfg} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


# -- the whole benchmark -------------------------------------------------------


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def slope(ns: list[int], ys: list[float]) -> float | None:
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys, strict=True) if y and y > 0]
    if len(pts) < 2:
        return None
    return float(np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)[0])


def embed_part(args, out_dir: str) -> dict[str, Any]:
    from benchmarks import embed_workloads

    return embed_workloads.main([
        "--photo-images", str(args.photo_images), "--fashion-images", str(args.embed_images),
        "--out", os.path.join(out_dir, "embed"),
        *(["--photos", args.photos] if args.photos else []),
        *(["--baseline-repo", args.baseline_repo] if args.baseline_repo else [])])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-out/throughput")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--exact-queries-1m", type=int, default=100,
                   help="queries for the exact searches at N >= 1M (each costs N x d)")
    p.add_argument("--skip-embed", action="store_true", help="skip (a) (~15 min)")
    p.add_argument("--embed-only", action="store_true", help="only (a)")
    p.add_argument("--embed-images", type=int, default=2000, help="Fashion-MNIST PNGs for (a)")
    p.add_argument("--photo-images", type=int, default=256, help="12 MP JPEGs for (a)")
    p.add_argument("--photos", default=None, help="folder of the photos (made if missing; "
                   "default OUT/embed/photos; 512 take ~850 MB)")
    p.add_argument("--baseline-repo", default=None,
                   help="also time dn2 embed of this checkout (with its own .venv)")
    p.add_argument("--sklearn-max", type=int, default=1_000_000)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker)), default=float))
        return {}

    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, Any] = {"config": {**vars(args), "dim": DIM, "k": K, "kmeans_c": KMEANS_C,
                                          "reference_sample": REFERENCE_SAMPLE,
                                          "rows_per_feature_shard": ROWS_PER_SHARD,
                                          "cpus": os.cpu_count()}}
    started = time.perf_counter()
    if not args.skip_embed:
        results["embed"] = embed_part(args, out_dir)
    if args.embed_only:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2, default=float)
        return results
    sizes = [int(s) for s in args.sizes.split(",")]
    queries = os.path.join(out_dir, "queries.npy")
    np.save(queries, next(mixture(args.queries, seed=SEED + 999)))
    rows = []
    for n in sizes:
        feats = os.path.join(out_dir, f"features-{n}")
        t = time.perf_counter()
        write_features(feats, n, seed=SEED + n)
        print(f"N={n}: features ready ({time.perf_counter() - t:.0f}s)", flush=True)
        exact_nq = args.queries if n < 1_000_000 else min(args.queries, args.exact_queries_1m)
        for method in ("flat", "kmeans", "ivf", "ivf-ondisk", "hnsw"):
            index = os.path.join(out_dir, f"index-{method}-{n}")
            b = run_worker({"task": "build", "method": method, "n": n, "features": feats,
                            "index": index})
            scorers = ["flat", "flat-stream"] if method == "flat" else [method]
            for sm in scorers:
                nq = exact_nq if sm.startswith("flat") else args.queries
                s = run_worker({"task": "score", "method": sm, "n": n, "features": feats,
                                "index": index, "queries": queries, "nq": nq})
                rows.append({"n": n, "method": sm, "build": b if sm == method else None,
                             "score": s})
                print(f"N={n:>8} {sm:<12} build {b['seconds']:7.1f}s peak "
                      f"{gib(b['peak_rss'])} GiB | score {s['qps']:9.1f} q/s "
                      f"(nq {s['queries']}) peak {gib(s['peak_rss'])} GiB", flush=True)
        for sm in ("faiss-bare", "sklearn", "pyod-balltree"):
            if (sm == "sklearn" and n > args.sklearn_max) or (sm == "pyod-balltree"
                                                               and n > PYOD_MAX):
                continue
            s = run_worker({"task": "score", "method": sm, "n": n, "features": feats,
                            "queries": queries,
                            "nq": PYOD_QUERIES if sm == "pyod-balltree" else exact_nq})
            rows.append({"n": n, "method": sm, "build": None, "score": s})
            print(f"N={n:>8} {sm:<12} load+fit {s['load_seconds']:7.1f}s | score "
                  f"{s['qps']:9.1f} q/s (nq {s['queries']}) peak {gib(s['peak_rss'])} GiB",
                  flush=True)
    results["rows"] = rows
    results["seconds"] = time.perf_counter() - started
    results["checks"] = checks(rows, sizes)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    table = markdown(rows, sizes, results)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    plot(rows, sizes, os.path.join(out_dir, "scaling.png"))
    print(table)
    print(f"total {results['seconds']:.0f}s; outputs in {out_dir}")
    return results


def _get(rows, n, method):
    return next((r for r in rows if r["n"] == n and r["method"] == method), None)


def checks(rows, sizes) -> dict[str, Any]:
    c: dict[str, Any] = {}
    n100 = 100_000 if 100_000 in sizes else None
    if n100:
        sk, fl, bare, po = (_get(rows, n100, m)
                            for m in ("sklearn", "flat", "faiss-bare", "pyod-balltree"))
        iv, hn = _get(rows, n100, "ivf"), _get(rows, n100, "hnsw")
        if sk:
            c["faiss_over_sklearn_100k"] = {
                "dn2_exact": fl["score"]["qps"] / sk["score"]["qps"],
                "bare_faiss": bare["score"]["qps"] / sk["score"]["qps"],
                "dn2_ivf": iv["score"]["qps"] / sk["score"]["qps"],
                "ivf_recall_at_2": iv["build"]["ivf"]["recall"]["recall_at_k"],
                "ivf_nlist": iv["build"]["ivf"]["nlist"],
                "ivf_nprobe": iv["build"]["ivf"]["nprobe"],
                "dn2_hnsw": hn["score"]["qps"] / sk["score"]["qps"],
                "hnsw_recall_at_2": hn["build"]["hnsw"]["recall"]["recall_at_k"],
                "hnsw_ef_search": hn["build"]["hnsw"]["ef_search"], "target": 20}
        if po:
            c["faiss_over_pyod_balltree_100k"] = {
                "dn2_exact": fl["score"]["qps"] / po["score"]["qps"],
                "bare_faiss": bare["score"]["qps"] / po["score"]["qps"], "target": 20}
    nmax = max(sizes)
    km, fl, iv = (_get(rows, nmax, m) for m in ("kmeans", "flat", "ivf"))
    c[f"kmeans_over_exact_{nmax}"] = {"ratio": km["score"]["qps"] / fl["score"]["qps"],
                                      "target": 100}
    c[f"ivf_{nmax}"] = {"recall_at_2": iv["build"]["ivf"]["recall"]["recall_at_k"],
                        "nlist": iv["build"]["ivf"]["nlist"],
                        "nprobe": iv["build"]["ivf"]["nprobe"],
                        "speedup_over_exact": iv["score"]["qps"] / fl["score"]["qps"],
                        "target_recall": 0.95}
    hn = _get(rows, nmax, "hnsw")
    c[f"hnsw_{nmax}"] = {"recall_at_2": hn["build"]["hnsw"]["recall"]["recall_at_k"],
                         "m": HNSW_M, "ef_search": hn["build"]["hnsw"]["ef_search"],
                         "speedup_over_exact": hn["score"]["qps"] / fl["score"]["qps"]}
    mem = {}
    for n in sizes:
        b = _get(rows, n, "flat")["build"]
        budget = 1.5 * (b["largest_feature_shard_bytes"] + b["index_bytes"])
        mem[n] = {"peak": b["peak_rss"], "peak_minus_imports": b["peak_rss"] - b["baseline_rss"],
                  "budget_1.5x": budget, "ratio": b["peak_rss"] / budget,
                  "ratio_minus_imports": (b["peak_rss"] - b["baseline_rss"]) / budget}
    c["streaming_build_memory"] = mem
    # Same queries, same k: every exact method must agree on the mean distance.
    agree = {}
    for n in sizes:
        ms = {m: _get(rows, n, m)["score"]["mean_score"] for m in
              ("flat", "flat-stream", "faiss-bare", "sklearn") if _get(rows, n, m)}
        agree[n] = {"mean_distance": ms, "max_rel_diff": float(
            (max(ms.values()) - min(ms.values())) / max(ms.values()))}
    c["exact_methods_agree"] = agree
    return c


def markdown(rows, sizes, results) -> str:
    lines = ["| N | method | build s | build peak GiB | score q/s | queries | load s | "
             "score peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, s = r["build"], r["score"]
        lines.append(
            f"| {r['n']} | {r['method']} | {b['seconds']:.1f} | {gib(b['peak_rss'])} | "
            if b else f"| {r['n']} | {r['method']} | - | - | ")
        lines[-1] += (f"{s['qps']:.1f} | {s['queries']} | {s['load_seconds']:.1f} | "
                      f"{gib(s['peak_rss'])} |")
    lines += ["", "Growth with N (log-log slope: 1 = linear):", "",
              "| method | search s/query | score peak RSS | build s | build peak RSS |",
              "|---|---|---|---|---|"]
    for m in ("flat", "flat-stream", "faiss-bare", "kmeans", "ivf", "ivf-ondisk", "hnsw",
              "sklearn", "pyod-balltree"):
        rs = [r for r in rows if r["method"] == m]
        if len(rs) < 2:
            continue
        ns = [r["n"] for r in rs]

        def f(v):
            return "-" if v is None else f"{v:.2f}"

        bs = [r["build"] for r in rs]
        lines.append(f"| {m} | {f(slope(ns, [1 / r['score']['qps'] for r in rs]))} | "
                     f"{f(slope(ns, [r['score']['peak_rss'] for r in rs]))} | "
                     f"{f(slope(ns, [b['seconds'] for b in bs]) if all(bs) else None)} | "
                     f"{f(slope(ns, [b['peak_rss'] for b in bs]) if all(bs) else None)} |")
    c = results["checks"]
    lines += ["", "Checks:"]
    if "faiss_over_sklearn_100k" in c:
        v = c["faiss_over_sklearn_100k"]
        lines.append(f"- faiss / sklearn NearestNeighbors(brute) q/s at 100k: dn2 exact "
                     f"{v['dn2_exact']:.2f}x, bare faiss {v['bare_faiss']:.2f}x, dn2 IVF-Flat "
                     f"(nlist {v['ivf_nlist']}, nprobe {v['ivf_nprobe']}, recall@2 "
                     f"{v['ivf_recall_at_2']:.3f}) {v['dn2_ivf']:.1f}x, dn2 HNSW (M {HNSW_M}, "
                     f"efSearch {v['hnsw_ef_search']}, recall@2 {v['hnsw_recall_at_2']:.3f}) "
                     f"{v['dn2_hnsw']:.1f}x (target 20x)")
    if "faiss_over_pyod_balltree_100k" in c:
        v = c["faiss_over_pyod_balltree_100k"]
        lines.append(f"- faiss / PyOD KNN's scoring path (BallTree, one query at a time) q/s "
                     f"at 100k: dn2 exact {v['dn2_exact']:.1f}x, bare faiss "
                     f"{v['bare_faiss']:.1f}x (target 20x)")
    for key, v in c.items():
        if key.startswith("kmeans_over_exact"):
            lines.append(f"- K-means C={KMEANS_C} / exact q/s at N={key.rsplit('_', 1)[1]}: "
                         f"{v['ratio']:.0f}x (target 100x)")
        if key.startswith("hnsw_"):
            lines.append(f"- HNSW M {v['m']} efSearch {v['ef_search']} at N={key[5:]}: recall@2 "
                         f"{v['recall_at_2']:.3f}, {v['speedup_over_exact']:.1f}x the exact q/s")
        if key.startswith("ivf_"):
            lines.append(f"- IVF-Flat nlist {v['nlist']} nprobe {v['nprobe']} at "
                         f"N={key[4:]}: recall@2 {v['recall_at_2']:.3f} (target 0.95), "
                         f"{v['speedup_over_exact']:.1f}x the exact q/s")
    for n, v in c["streaming_build_memory"].items():
        lines.append(f"- streaming flat build N={n}: the build's own memory (peak RSS - RSS "
                     f"after imports) {gib(v['peak_minus_imports'])} GiB vs 1.5 x (largest "
                     f"feature shard + index) = {gib(v['budget_1.5x'])} GiB: ratio "
                     f"{v['ratio_minus_imports']:.2f} (whole process, imports included: peak "
                     f"{gib(v['peak'])} GiB, ratio {v['ratio']:.2f})")
    for n, v in c["exact_methods_agree"].items():
        lines.append(f"- N={n}: exact methods' mean 2-NN distance agree within "
                     f"{v['max_rel_diff']:.1e} (relative)")
    if "embed" in results:
        from benchmarks import embed_workloads

        lines += ["", embed_workloads.markdown(results["embed"])]
    return "\n".join(lines) + "\n"


def plot(rows, sizes, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for m in ("flat", "flat-stream", "faiss-bare", "kmeans", "ivf", "ivf-ondisk", "hnsw",
              "sklearn", "pyod-balltree"):
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        axes[0].plot(ns, [1e3 / r["score"]["qps"] for r in rs], "o-", label=m)
        axes[1].plot(ns, [r["score"]["peak_rss"] / 2**30 for r in rs], "o-", label=m)
        if all(r["build"] for r in rs):
            axes[2].plot(ns, [r["build"]["peak_rss"] / 2**30 for r in rs], "o-", label=m)
    for ax, title in zip(axes, ("search ms / query", "scoring peak RSS (GiB)",
                                "build peak RSS (GiB)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N normal features (1280-d)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
