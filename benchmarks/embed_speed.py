"""Embedding images/s on this machine: the fast CPU path against the plain path.

Fast = channels-last memory format + torch.inference_mode (dn2ops.embed.Embedder,
fast=True); plain = NCHW float32 under no_grad. Both run the same backbone on the
same batches, interleaved rep by rep so that load on the machine hits both alike.

    python benchmarks/embed_speed.py [--backbone efficientnet_lite0] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dn2ops.backbones import get_spec, load_backbone
from dn2ops.embed import Embedder


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    crop = get_spec(args.backbone).preprocessing.crop
    x = torch.randn(args.batch_size, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    paths = {name: Embedder(load_backbone(args.backbone), device=args.device, fast=fast)
             for name, fast in (("plain", False), ("fast", True))}
    outs = {name: emb(x) for name, emb in paths.items()}  # warm-up, and the features
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.reps):
        for name, emb in paths.items():
            t0 = time.perf_counter()
            emb(x)
            rates[name].append(args.batch_size / (time.perf_counter() - t0))
    med = {name: statistics.median(r) for name, r in rates.items()}
    diff = float(np.abs(outs["fast"] - outs["plain"]).max())
    print(f"{args.backbone} batch {args.batch_size} on {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} reps:")
    for name in paths:
        print(f"  {name:<6} {med[name]:7.1f} images/s  (reps: "
              + ", ".join(f"{r:.1f}" for r in rates[name]) + ")")
    print(f"  fast/plain = {med['fast'] / med['plain']:.2f}x; max |feature difference| = "
          f"{diff:.2e}")
    return {"images_per_s": med, "ratio": med["fast"] / med["plain"], "max_abs_diff": diff}


if __name__ == "__main__":
    main()
