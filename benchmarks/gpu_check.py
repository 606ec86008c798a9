"""GPU against CPU in one short run: embedding images/s and faiss search queries/s.

* embedding: efficientnet_lite0 and resnet50 with random weights (speed
  only: the features mean nothing) at batch 256, through dn2's Embedder
  (CUDA: autocast bf16/fp16 + pinned memory; CPU: channels-last), on cuda and
  on cpu;
* faiss at N = 1M normal features (1280-d float32, seeded): bare
  IndexFlatL2 on all GPUs vs on the CPU, and dn2's exact sharded search
  (dn2ops.gpu.knn_sharded_gpu vs dn2ops.knn.knn_sharded, 10 shards of 100k,
  both re-ranked exactly), with the largest distance difference between
  the two paths.

Needs a CUDA GPU and faiss with GPU support (pip install 'dn2[gpu]'); exits 2
with a message otherwise. About 5 minutes on one GPU and 16 cores.

    python benchmarks/gpu_check.py [--out bench-out/gpu_check] [--n 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def embed_rate(name: str, device: str, batch: int, batches: int) -> float:
    import torch

    from dn2ops.backbones import get_spec, load_backbone
    from dn2ops.embed import Embedder

    crop = get_spec(name).preprocessing.crop
    embedder = Embedder(load_backbone(name, "random"), device=device)
    x = torch.randn(batch, 3, crop, crop)
    embedder(x)  # warm-up: cuDNN autotuning, oneDNN primitive creation
    t = time.perf_counter()
    for _ in range(batches):
        embedder(x)  # returns numpy: the device work is finished
    return batch * batches / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out/gpu_check"))
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)

    import faiss
    import torch

    from dn2ops import gpu
    from dn2ops.knn import knn_sharded

    if not torch.cuda.is_available() or gpu.faiss_gpus() == 0:
        print(f"needs a CUDA GPU seen by torch ({torch.cuda.is_available()}) and by faiss "
              f"({gpu.faiss_gpus()} GPUs; install dn2[gpu])", file=sys.stderr)
        sys.exit(2)
    res = {"device": torch.cuda.get_device_name(0), "cpus": os.cpu_count(),
           "batch": args.batch, "embed_images_per_s": {}, "faiss": {}}
    for name in ("efficientnet_lite0", "resnet50"):
        rates = {"cuda": embed_rate(name, "cuda", args.batch, 20),
                 "cpu": embed_rate(name, "cpu", args.batch, 2)}
        rates["gpu_over_cpu"] = rates["cuda"] / rates["cpu"]
        res["embed_images_per_s"][name] = rates
        print(f"embed {name:<18} batch {args.batch}: cuda {rates['cuda']:8.1f} img/s, "
              f"cpu {rates['cpu']:7.1f} img/s ({rates['gpu_over_cpu']:.1f}x)", flush=True)

    rng = np.random.default_rng(0)
    d = 1280
    xb = (rng.random((args.n, d), dtype=np.float32) * 2)  # non-negative, like CNN features
    xq = (rng.random((args.queries, d), dtype=np.float32) * 2)
    k = 2
    cpu_index = faiss.IndexFlatL2(d)
    cpu_index.add(xb)
    t = time.perf_counter()
    Dc, _ = cpu_index.search(xq, k)
    cpu_qps = args.queries / (time.perf_counter() - t)
    gpu_index = gpu.to_gpu(cpu_index)
    gpu_index.search(xq[:10], k)  # warm-up
    t = time.perf_counter()
    Dg, _ = gpu_index.search(xq, k)
    gpu_qps = args.queries / (time.perf_counter() - t)
    res["faiss"]["bare_flat"] = {"n": args.n, "queries": args.queries, "cpu_qps": cpu_qps,
                                 "gpu_qps": gpu_qps, "gpu_over_cpu": gpu_qps / cpu_qps,
                                 "max_abs_sq_distance_diff": float(np.abs(Dg - Dc).max())}
    del gpu_index, cpu_index
    shards = np.array_split(xb, 10)
    t = time.perf_counter()
    Dc, Ic = knn_sharded(xq, shards, k)
    cpu_qps = args.queries / (time.perf_counter() - t)
    flats = [gpu.GpuFlat(s) for s in shards]
    t = time.perf_counter()
    Dg, Ig = gpu.knn_sharded_gpu(xq, flats, k)
    gpu_qps = args.queries / (time.perf_counter() - t)
    res["faiss"]["dn2_exact_sharded"] = {
        "n": args.n, "queries": args.queries, "shards": 10, "cpu_qps": cpu_qps,
        "gpu_qps": gpu_qps, "gpu_over_cpu": gpu_qps / cpu_qps,
        "max_abs_distance_diff": float(np.abs(Dg - Dc).max()),
        "same_ids": float((Ig == Ic).mean())}
    for key, v in res["faiss"].items():
        print(f"faiss {key:<18} N={args.n}: gpu {v['gpu_qps']:9.1f} q/s, cpu "
              f"{v['cpu_qps']:8.1f} q/s ({v['gpu_over_cpu']:.1f}x)", flush=True)
    print(f"dn2 exact GPU vs CPU: max |dD| "
          f"{res['faiss']['dn2_exact_sharded']['max_abs_distance_diff']:.2e}, same ids "
          f"{res['faiss']['dn2_exact_sharded']['same_ids']:.4f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
