"""GPU against CPU in one short run: embedding images/s and faiss search queries/s.

* embedding: efficientnet_lite0 and resnet50 with random weights (speed
  only: the features mean nothing) at batch 256, through dn2's Embedder
  (CUDA: autocast bf16/fp16 + pinned memory; CPU: channels-last), on cuda and
  on cpu;
* JPEG decoding, images/s, on N phone-sized 12 MP photos
  (benchmarks.datasets.write_photo_store): nvJPEG on the GPU
  (``torchvision.io.decode_jpeg(list, device="cuda")``, lists of 64 files,
  then resize + center crop on the GPU) against dn2's CPU path (draft decoding +
  crop, dn2ops.embed.stage.prepare, on a thread pool of all cores); decides whether
  a ``--decode gpu`` is worth adding. Skipped, with the reason, without CUDA;
* faiss at N = 1M normal features (1280-d float32, seeded): bare
  IndexFlatL2 on all GPUs vs on the CPU, and dn2's exact sharded search
  (dn2ops.index.gpu.knn_sharded_gpu vs dn2ops.index.knn.knn_sharded, 10 shards of 100k,
  both re-ranked exactly), with the largest distance difference between
  the two paths.

* the process model on a GPU worker (docs/memory.md, "Embedding workers"): ``dn2 embed``
  with the defaults (torch on the GPU) on the same photos, as one process whose 4 threads
  share one model (what ``--experiments no_use_multiple_sdk_containers`` gives on
  Dataflow: ``--direct_num_workers 4 --direct_running_mode multi_threading`` here) and as
  4 processes with a model each (``multi_processing``, Dataflow's default): images/s,
  the summed peak RSS of the process tree, the GPU memory used (nvidia-smi), the model
  loads (dn2's log) and the processes with torch loaded (benchmarks.worker_memory).

Needs a CUDA GPU (exits 2 with a message otherwise); the faiss part also needs
faiss with GPU support (pip install 'dn2[gpu]') and is skipped, said so, without.
About 5 minutes on one GPU and 16 cores.

    python benchmarks/gpu_check.py [--out bench-out/gpu_check] [--n 1000000]
        [--photos DIR] [--decode-images 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere (benchmarks.datasets)
    sys.path.insert(0, REPO)

def embed_rate(name: str, device: str, batch: int, batches: int) -> float:
    import torch

    from dn2ops.embed.backbones import get_spec, load_backbone
    from dn2ops.engines.torch import Embedder

    crop = get_spec(name).preprocessing.crop
    embedder = Embedder(load_backbone(name, "random"), device=device)
    x = torch.randn(batch, 3, crop, crop)
    embedder(x)  # warm-up: cuDNN autotuning, oneDNN primitive creation
    t = time.perf_counter()
    for _ in range(batches):
        embedder(x)  # returns numpy: the device work is finished
    return batch * batches / (time.perf_counter() - t)


def decode_rates(paths: list[str], batch: int) -> dict:
    """images/s of JPEG file bytes -> uint8 (3, 224, 224) crops: GPU vs dn2's CPU path."""
    import concurrent.futures

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    from dn2ops.embed.backbones import get_spec
    from dn2ops.embed.stage import prepare

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU"}
    pre = get_spec("efficientnet_lite0").preprocessing
    data = [torch.frombuffer(bytearray(open(p, "rb").read()), dtype=torch.uint8) for p in paths]

    def gpu(chunk):  # nvJPEG decodes a list in one call; EXIF is not applied on the GPU
        images = decode_jpeg(chunk, mode=ImageReadMode.RGB, device="cuda")
        return [F.center_crop(F.resize(im, pre.resize, antialias=True), pre.crop)
                for im in images]

    gpu(data[:2])  # warm-up: nvJPEG handles, CUDA kernels
    torch.cuda.synchronize()
    t = time.perf_counter()
    for a in range(0, len(data), batch):
        gpu(data[a:a + batch])
    torch.cuda.synchronize()
    gpu_rate = len(data) / (time.perf_counter() - t)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        t = time.perf_counter()
        list(pool.map(lambda p: prepare({"uri": p}, pre, decode="draft"), paths))
        cpu_rate = len(paths) / (time.perf_counter() - t)
    return {"images": len(paths), "gpu_nvjpeg_images_per_s": gpu_rate,
            "cpu_draft_images_per_s": cpu_rate, "cpu_threads": os.cpu_count(),
            "gpu_over_cpu": gpu_rate / cpu_rate}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench-out/gpu_check"))
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--photos", default=None, help="folder for the decode photos (made if "
                   "missing; default OUT/photos)")
    p.add_argument("--decode-images", type=int, default=128)
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU seen by torch (torch.cuda.is_available() is False)",
              file=sys.stderr)
        sys.exit(2)
    res = {"device": torch.cuda.get_device_name(0), "cpus": os.cpu_count(),
           "batch": args.batch, "embed_images_per_s": {}}
    res["decode"] = decode_part(args)
    for name in ("efficientnet_lite0", "resnet50"):
        rates = {"cuda": embed_rate(name, "cuda", args.batch, 20),
                 "cpu": embed_rate(name, "cpu", args.batch, 2)}
        rates["gpu_over_cpu"] = rates["cuda"] / rates["cpu"]
        res["embed_images_per_s"][name] = rates
        print(f"embed {name:<18} batch {args.batch}: cuda {rates['cuda']:8.1f} img/s, "
              f"cpu {rates['cpu']:7.1f} img/s ({rates['gpu_over_cpu']:.1f}x)", flush=True)
    res["process_model"] = process_model_part(args)
    res["faiss"] = faiss_part(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=2)
    return res


def _gpu_memory_mib() -> int | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(x) for x in out.split())


def process_model_part(args) -> dict:
    """One process sharing one model across 4 threads, against 4 processes with a model
    each: dn2 embed with its defaults on the GPU, each run a fresh process tree."""
    import threading

    from benchmarks.datasets import write_manifest, write_photo_store
    from benchmarks.worker_memory import REPO, embed

    photos = write_photo_store(args.photos or os.path.join(args.out, "photos"),
                               args.decode_images, workers=os.cpu_count())
    manifest = os.path.join(args.out, "photos.csv")
    write_manifest([{"uri": p} for p in photos], manifest)
    res = {}
    for name, mode in (("1 process, 4 threads", "multi_threading"),
                       ("4 processes", "multi_processing")):
        peak, done = [0], threading.Event()

        def watch(peak=peak, done=done):
            while not done.wait(0.5):
                peak[0] = max(peak[0], _gpu_memory_mib() or 0)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        r = embed(REPO, manifest, os.path.join(args.out, f"embed-{mode}"),
                  ["--direct_num_workers", "4", "--direct_running_mode", mode])
        done.set()
        watcher.join()
        r["gpu_memory_peak_mib"] = peak[0]
        r["images_per_s"] = round(len(photos) / r["wall_s"], 1)
        res[name] = r
        print(f"process model, {name}: {r['images_per_s']} img/s, host RSS peak "
              f"{r['peak_gib']} GiB, GPU memory peak {peak[0]} MiB, model loads "
              f"{r['model_loads']}, processes with torch {r['torch_pids']}", flush=True)
    return res


def decode_part(args) -> dict:
    from benchmarks.datasets import write_photo_store

    photos = write_photo_store(args.photos or os.path.join(args.out, "photos"),
                               args.decode_images, workers=os.cpu_count())
    res = decode_rates(photos, batch=64)
    print(f"decode {args.decode_images} 12 MP JPEGs: " + (
        f"GPU nvJPEG {res['gpu_nvjpeg_images_per_s']:.1f} img/s, CPU draft "
        f"({res['cpu_threads']} threads) {res['cpu_draft_images_per_s']:.1f} img/s "
        f"({res['gpu_over_cpu']:.1f}x)" if "skipped" not in res else res["skipped"]),
        flush=True)
    return res


def faiss_part(args) -> dict:
    import faiss

    from dn2ops.index import gpu

    if gpu.faiss_gpus() == 0:
        print("faiss: skipped, faiss sees no GPU (install dn2[gpu])", file=sys.stderr)
        return {"skipped": "faiss sees no GPU (install dn2[gpu])"}
    res = {}
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
    res["bare_flat"] = {"n": args.n, "queries": args.queries, "cpu_qps": cpu_qps,
                        "gpu_qps": gpu_qps, "gpu_over_cpu": gpu_qps / cpu_qps,
                        "max_abs_sq_distance_diff": float(np.abs(Dg - Dc).max())}
    del gpu_index, cpu_index
    res["dn2_exact_sharded"] = _sharded(xq, xb, k, args)
    for key, v in res.items():
        print(f"faiss {key:<18} N={args.n}: gpu {v['gpu_qps']:9.1f} q/s, cpu "
              f"{v['cpu_qps']:8.1f} q/s ({v['gpu_over_cpu']:.1f}x)", flush=True)
    print(f"dn2 exact GPU vs CPU: max |dD| "
          f"{res['dn2_exact_sharded']['max_abs_distance_diff']:.2e}, same ids "
          f"{res['dn2_exact_sharded']['same_ids']:.4f}")
    return res


def _sharded(xq, xb, k, args) -> dict:
    from dn2ops.index import gpu
    from dn2ops.index.knn import knn_sharded

    shards = np.array_split(xb, 10)
    t = time.perf_counter()
    Dc, Ic = knn_sharded(xq, shards, k)
    cpu_qps = args.queries / (time.perf_counter() - t)
    flats = [gpu.GpuFlat(s) for s in shards]
    t = time.perf_counter()
    Dg, Ig = gpu.knn_sharded_gpu(xq, flats, k)
    gpu_qps = args.queries / (time.perf_counter() - t)
    return {"n": args.n, "queries": args.queries, "shards": 10, "cpu_qps": cpu_qps,
            "gpu_qps": gpu_qps, "gpu_over_cpu": gpu_qps / cpu_qps,
            "max_abs_distance_diff": float(np.abs(Dg - Dc).max()),
            "same_ids": float((Ig == Ic).mean())}


if __name__ == "__main__":
    main()
