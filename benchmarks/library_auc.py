"""Library-level DN2 on Fashion-MNIST: each class in turn normal, ROC-AUC per class.

Protocol (issue 2): EfficientNet-Lite0 features; normal = the first
``--train-per-class`` training images of the class; scored = the first
``--test`` test images; k=2. No Beam: decode -> preprocess -> Embedder ->
DN2Scorer, the reference that the pipeline's written tables are checked against.

    python benchmarks/library_auc.py [--normalize imagenet] [--out bench-out/library]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere (benchmarks.datasets)
    sys.path.insert(0, REPO)

from benchmarks.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist  # noqa: E402
from dn2ops.embed.backbones import get_spec, load_backbone  # noqa: E402
from dn2ops.embed.images import load_image  # noqa: E402
from dn2ops.embed.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing  # noqa: E402
from dn2ops.engines.torch import Embedder  # noqa: E402
from dn2ops.score.estimator import DN2Scorer  # noqa: E402


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def normalised(pre: Preprocessing, image: Image.Image) -> torch.Tensor:
    """One RGB PIL image -> float32 (3, crop, crop): the crop, then the normalisation."""
    return pre.normalize(torch.from_numpy(pre.crop_image(image)))


def embed(images: np.ndarray, embedder: Embedder, pre: Preprocessing, batch: int) -> np.ndarray:
    """uint8 (n, 28, 28) -> features (n, dim), through the same decode path as the pipeline."""
    out = []
    for i in range(0, len(images), batch):
        tensors = [normalised(pre, load_image(png_bytes(x))) for x in images[i:i + batch]]
        out.append(embedder(torch.stack(tensors)))
    return np.concatenate(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--normalize", choices=["model", "imagenet"], default="model")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="bench-out/library")
    args = p.parse_args(argv)

    spec = get_spec(args.backbone)
    pre = spec.preprocessing
    if args.normalize == "imagenet":
        pre = Preprocessing(resize=pre.resize, crop=pre.crop, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    xte, yte = xte[: args.test], yte[: args.test]
    train_idx = np.concatenate(
        [np.flatnonzero(ytr == c)[: args.train_per_class] for c in range(10)])

    embedder = Embedder(load_backbone(args.backbone), device="auto")
    t0 = time.perf_counter()
    ftr = embed(xtr[train_idx], embedder, pre, args.batch_size)
    fte = embed(xte, embedder, pre, args.batch_size)
    t_embed = time.perf_counter() - t0
    ytr_sel = ytr[train_idx]

    aucs = {}
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        scores = DN2Scorer(k=args.k).fit(ftr[ytr_sel == c]).score_samples(fte)
        aucs[name] = float(roc_auc_score(yte != c, scores))
    result = {"protocol": vars(args), "preprocessing": pre.to_dict(), "roc_auc": aucs,
              "mean_roc_auc": float(np.mean(list(aucs.values()))),
              "embed_seconds": t_embed, "images_embedded": int(len(ftr) + len(fte))}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"auc-{args.normalize}.json"), "w") as f:
        json.dump(result, f, indent=2)
    np.savez(os.path.join(args.out, f"features-{args.normalize}.npz"),
             ftr=ftr, ytr=ytr_sel, fte=fte, yte=yte)
    print(f"{args.backbone} normalize={args.normalize} k={args.k} "
          f"train/class={args.train_per_class} test={args.test}")
    for name, auc in aucs.items():
        print(f"  {name:<12} {auc:.4f}")
    print(f"  {'mean':<12} {result['mean_roc_auc']:.4f}   "
          f"(embedded {result['images_embedded']} images in {t_embed:.0f}s)")
    return result


if __name__ == "__main__":
    main()
