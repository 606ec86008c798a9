"""The engine table: images/s of torch, ONNX Runtime and OpenVINO, side by side in one run.

Each engine runs through its dn2 model handler (dn2ops.engines.auto.make_handler:
``load_model()`` then ``run_inference()`` on uint8 batches, normalisation
included), on the same seeded batches, for EfficientNet-Lite0 and ResNet-50
(``--weights random``, seeded: speed only) at batch 1, 16 and 64. Every engine
gets all the cores (``--threads``, default: all), as when nothing else runs.
Rounds interleave the engines so that load on the machine hits all alike; a
cell's figure is the median of its rounds, each timing at least ``--seconds``.
Also printed: each engine's max |feature difference| from torch, against the
feature scale (max |torch feature|), on the batch of 64.

    python benchmarks/embed_speed.py [--backbones efficientnet_lite0,resnet50]
        [--batches 1,16,64] [--rounds 3] [--seconds 2] [--out bench-out/engines]

Writes OUT/engines.json and OUT/engines.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from dn2ops.config import EmbedConfig
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.auto import make_handler
from dn2ops.engines.base import ENGINES, installed, usable_cores

WEIGHTS = {"efficientnet_lite0": None, "resnet50": "random"}


def load(engine: str, backbone: str, threads: int):
    """(handler, model, load seconds), the export already cached."""
    handler = make_handler(EmbedPlan.resolve(EmbedConfig(
        backbone=backbone, engine=engine, device="cpu",
        weights=WEIGHTS.get(backbone, "random"), threads=threads)))
    t = time.perf_counter()
    model = handler.load_model()
    return handler, model, time.perf_counter() - t


def rate(handler, model, batch: list[np.ndarray], seconds: float) -> float:
    """images/s of run_inference on ``batch``, timed over >= ``seconds``."""
    n, t0 = 0, time.perf_counter()
    while True:
        handler.run_inference(batch, model)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n * len(batch) / elapsed


def features(handler, model, batch: list[np.ndarray]) -> np.ndarray:
    return np.stack([r.inference for r in handler.run_inference(batch, model)])


def measure(backbone: str, engines: list[str], batches: list[int], args) -> dict:
    crop = get_spec(backbone).preprocessing.crop
    x = np.random.default_rng(0).integers(0, 256, (max(batches), 3, crop, crop), np.uint8)
    loaded = {e: load(e, backbone, args.threads) for e in engines}
    big = list(x)
    ref = features(*loaded["torch"][:2], big)
    out = {"load_seconds": {e: round(v[2], 2) for e, v in loaded.items()},
           "feature_scale": float(np.abs(ref).max()), "max_abs_diff": {}, "images_per_s": {}}
    for e in engines:
        out["max_abs_diff"][e] = float(np.abs(features(*loaded[e][:2], big) - ref).max())
    for b in batches:
        batch = list(x[:b])
        for e in engines:
            rate(*loaded[e][:2], batch, 0.2)  # warm-up: first calls allocate
        rounds = {e: [] for e in engines}
        for _ in range(args.rounds):
            for e in engines:
                rounds[e].append(rate(*loaded[e][:2], batch, args.seconds))
        out["images_per_s"][b] = {e: statistics.median(r) for e, r in rounds.items()}
        print(f"{backbone} batch {b:>3}: " + ", ".join(
            f"{e} {out['images_per_s'][b][e]:7.1f}" for e in engines) + " images/s", flush=True)
    return out


def markdown(res: dict, engines: list[str]) -> str:
    lines = [f"Engine table: images/s, {res['threads']} threads, {res['cores']} cores, median "
             f"of {res['rounds']} rounds (benchmarks/embed_speed.py)", "",
             "| backbone | batch | " + " | ".join(engines) + " | best / torch |",
             "|---|---|" + "---|" * (len(engines) + 1)]
    for name, r in res["backbones"].items():
        for b, row in r["images_per_s"].items():
            best = max(row.values())
            lines.append(f"| {name} | {b} | " + " | ".join(f"{row[e]:.1f}" for e in engines)
                         + f" | {best / row['torch']:.1f}x |")
    lines += ["", "Max |feature difference| from torch (batch of 64), and the feature scale:"]
    for name, r in res["backbones"].items():
        lines.append(f"- {name}: " + ", ".join(
            f"{e} {r['max_abs_diff'][e]:.1e}" for e in engines if e != "torch")
            + f" (scale {r['feature_scale']:.2f}; bound 1e-4 x scale = "
              f"{1e-4 * r['feature_scale']:.1e})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=usable_cores())
    p.add_argument("--out", default="bench-out/engines")
    args = p.parse_args(argv)
    engines = [e for e in ENGINES if e != "auto" and installed(e)]
    batches = [int(b) for b in args.batches.split(",")]
    res = {"cores": usable_cores(), "threads": args.threads, "rounds": args.rounds,
           "seconds": args.seconds, "backbones": {}}
    for backbone in args.backbones.split(","):
        res["backbones"][backbone] = measure(backbone, engines, batches, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engines.json"), "w") as f:
        json.dump(res, f, indent=2)
    table = markdown(res, engines)
    with open(os.path.join(args.out, "engines.md"), "w") as f:
        f.write(table)
    print(table)
    return res


if __name__ == "__main__":
    main()
