"""Localisation benchmark of the heatmaps (dn2ops.score.heatmaps) with ground-truth masks.

Real images, no labels needed: a patch cut from an image of another class (Fashion-MNIST,
upsampled) or from the other photo (crops of scikit-learn's two sample photos, as the
speed benchmarks' photos are) is pasted into normal test images at a random place and
size (5-20 % of the area), half of them with blended (feathered) edges; the pasted area
is the mask. The K neighbours are retrieved as dn2 retrieves them (the default backbone's
pooled feature, the default transform, exact kNN over the normal set).

Figures: pixel ROC-AUC (scikit-learn) and PRO (per-region overlap, integrated up to a
false-positive rate of 0.3 and normalised, MVTec AD's definition) of the heatmaps, beside
a plain baseline: the absolute pixel difference to the nearest normal image (in pixels,
aligned: same size, same place), smoothed alike. MVTec AD itself is not here to run.

    python -m benchmarks.localisation                 # the product's default settings
    python -m benchmarks.localisation --k 2 4 --stages 2,3,4 1,2,4 2,4,5 --side 128 160 192
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from benchmarks.datasets import _sample_photos, load_fashion_mnist
from dn2ops import transforms
from dn2ops.config import DEFAULT_BACKBONE
from dn2ops.embed.backbones import get_spec, load_backbone
from dn2ops.index.knn import knn
from dn2ops.score import heatmaps
from dn2ops.transforms import DEFAULT as DEFAULT_TRANSFORM

FMNIST_SIZE = 224


def fmnist_sets(normal_class: int, n_normal: int, n_test: int, seed: int):
    """(normal RGB images, test RGB images, patch sources) of one Fashion-MNIST class,
    upsampled to FMNIST_SIZE."""
    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    rng = np.random.default_rng(seed)

    def up(a: np.ndarray) -> np.ndarray:
        img = Image.fromarray(a).convert("RGB").resize((FMNIST_SIZE,) * 2, Image.BILINEAR)
        return np.asarray(img)

    normal = [up(a) for a in xtr[ytr == normal_class][:n_normal]]
    test = [up(a) for a in xte[yte == normal_class][:n_test]]
    others = xte[yte != normal_class]
    sources = [up(a) for a in others[rng.choice(len(others), n_test, replace=False)]]
    return normal, test, sources


def photo_sets(photo: int, n_normal: int, n_test: int, seed: int, size: int = 320):
    """Random crops (half to all of each side, resized to ``size`` on the long side) of one
    sample photo: normal and test images; patch sources: crops of the other photo."""
    photos = _sample_photos()
    rng = np.random.default_rng(seed)

    def crop(src: np.ndarray) -> np.ndarray:
        h, w = src.shape[:2]
        ch, cw = rng.integers(h * 3 // 4, h + 1), rng.integers(w * 3 // 4, w + 1)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(np.ascontiguousarray(src[y:y + ch, x:x + cw]))
        scale = size / max(img.size)
        return np.asarray(img.resize((round(img.size[0] * scale), round(img.size[1] * scale)),
                                     Image.BILINEAR))

    normal = [crop(photos[photo]) for _ in range(n_normal)]
    test = [crop(photos[photo]) for _ in range(n_test)]
    sources = [crop(photos[1 - photo]) for _ in range(n_test)]
    return normal, test, sources


def paste(image: np.ndarray, source: np.ndarray, rng: np.random.Generator, blend: bool
          ) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with a patch of ``source`` (its central region) pasted at a random place,
    5-20 % of the image's area, aspect 1:2 to 2:1; ``blend``: feathered edges. Returns
    (the image, the mask (h, w) bool: where the patch's weight is >= 0.5)."""
    h, w = image.shape[:2]
    area = rng.uniform(0.05, 0.20) * h * w
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    ph = int(min(h - 2, round(np.sqrt(area / aspect))))
    pw = int(min(w - 2, round(area / max(ph, 1))))
    y, x = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    sh, sw = source.shape[:2]
    sy, sx = max(0, (sh - ph) // 2), max(0, (sw - pw) // 2)
    patch = np.asarray(Image.fromarray(source[sy:sy + ph, sx:sx + pw]).resize((pw, ph)))
    alpha = np.zeros((h, w), np.float32)
    alpha[y:y + ph, x:x + pw] = 1.0
    if blend:
        alpha = ndimage.gaussian_filter(alpha, 0.1 * min(ph, pw))
    full = image.astype(np.float32).copy()
    full[y:y + ph, x:x + pw] = patch
    out = alpha[..., None] * full + (1 - alpha[..., None]) * image.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8), alpha >= 0.5


class Retrieval:
    """dn2's image-level kNN: the default backbone's pooled feature of the centre crop,
    the default transform, exact search over the normal set."""

    def __init__(self, normal: Sequence[np.ndarray], backbone: str = DEFAULT_BACKBONE):
        import torch

        self.spec = get_spec(backbone)
        self.model = load_backbone(backbone)
        self.norm = self.spec.preprocessing.normalization()
        self.torch = torch
        self.xb = self.embed(normal)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        crops = np.stack([self.spec.preprocessing.crop_image(Image.fromarray(a))
                          for a in images])
        out = []
        with self.torch.inference_mode():
            for i in range(0, len(crops), 16):
                out.append(self.model(self.norm(self.torch.from_numpy(crops[i:i + 16]))).numpy())
        return transforms.apply(np.concatenate(out), DEFAULT_TRANSFORM)

    def neighbours(self, images: Sequence[np.ndarray], k: int) -> np.ndarray:
        return knn(self.embed(images), self.xb, k)[1]


def pro_score(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray],
              max_fpr: float = 0.3, steps: int = 200) -> float:
    """MVTec AD's PRO: mean overlap of each ground-truth region with the map above a
    threshold, against the false-positive rate on normal pixels, integrated up to
    ``max_fpr`` and divided by it."""
    scores = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([m.ravel() for m in masks])
    thresholds = np.quantile(scores[~truth], np.linspace(1.0, 1.0 - max_fpr, steps))
    regions = []
    for m, g in zip(maps, masks, strict=True):
        labels, n = ndimage.label(g)
        regions += [m[labels == r] for r in range(1, n + 1)]
    fprs, pros = [], []
    for t in thresholds:
        fprs.append(float((scores[~truth] >= t).mean()))
        pros.append(float(np.mean([(r >= t).mean() for r in regions])))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= max_fpr
    return float(np.trapezoid(pros[keep], fprs[keep]) / max_fpr)


def baseline_map(image: np.ndarray, normals: Sequence[np.ndarray], sigma: float) -> np.ndarray:
    """|image - nearest normal image| (channel mean), aligned: the normal of the same size
    nearest in pixels, compared at the same coordinates; smoothed like the heatmaps."""
    same = [n for n in normals if n.shape == image.shape] or [
        np.asarray(Image.fromarray(n).resize(image.shape[1::-1])) for n in normals]
    q = image.astype(np.float32)
    best = min(same, key=lambda n: float(((n.astype(np.float32) - q) ** 2).sum()))
    diff = np.abs(best.astype(np.float32) - q).mean(axis=2)
    return ndimage.gaussian_filter(diff, sigma * image.shape[0] / 320)


def heatmap(image: np.ndarray, neighbours: Sequence[np.ndarray],
            features: heatmaps.PatchFeatures, sigma: float) -> np.ndarray:
    """The product's map (dn2ops.score.heatmaps.location_scores) at the image's size."""
    img = Image.fromarray(image)
    resized = features.resized(img)
    scores = heatmaps.location_scores(features.maps(img),
                                      [features.maps(Image.fromarray(n)) for n in neighbours],
                                      resized.size[::-1], sigma=sigma)
    return np.asarray(Image.fromarray(scores, mode="F").resize(img.size, Image.BILINEAR))


def evaluate(kind: str, sets, k_values, stage_sets, sides, sigma, seed) -> list[dict]:
    normal, test, sources = sets
    rng = np.random.default_rng(seed)
    cases = [paste(t, s, rng, blend=i % 2 == 1)
             for i, (t, s) in enumerate(zip(test, sources, strict=True))]
    images, masks = [c[0] for c in cases], [c[1] for c in cases]
    retrieval = Retrieval(normal)
    nearest = retrieval.neighbours(images, max(k_values))
    rows = []
    base = [baseline_map(im, normal, sigma) for im in images]
    rows.append(_row(kind, "baseline |pixel diff|", base, masks, 0.0))
    for side, stages, k in itertools.product(sides, stage_sets, k_values):
        heatmaps.LITE_STAGES = stages  # the benchmark's knob; the product's default else
        features = heatmaps.PatchFeatures(DEFAULT_BACKBONE, side=side)
        started = time.perf_counter()
        maps = [heatmap(im, [normal[j] for j in nearest[i, :k]], features, sigma)
                for i, im in enumerate(images)]
        per_image = (time.perf_counter() - started) / len(images)
        rows.append(_row(kind, f"heatmap K={k} stages={','.join(map(str, stages))} "
                               f"side={side}", maps, masks, per_image))
    return rows


def _row(kind, method, maps, masks, seconds) -> dict:
    truth = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    return {"images": kind, "method": method, "pixel_auc": roc_auc_score(truth, scores),
            "pro": pro_score(maps, masks), "s_per_image": seconds}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[4])
    p.add_argument("--stages", nargs="+", default=[",".join(map(str, heatmaps.LITE_STAGES))])
    p.add_argument("--side", type=int, nargs="+", default=[128])
    p.add_argument("--sigma", type=float, default=4.0)
    p.add_argument("--kinds", nargs="+", default=["fmnist", "photo"],
                   choices=["fmnist", "photo"])
    p.add_argument("--normal", type=int, default=60, help="normal images a set")
    p.add_argument("--test", type=int, default=10, help="pasted test images a set")
    p.add_argument("--fmnist-classes", type=int, nargs="+", default=[0, 7, 8])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    stage_sets = [tuple(int(s) for s in st.split(",")) for st in a.stages]
    rows = []
    for c in a.fmnist_classes if "fmnist" in a.kinds else ():
        rows += evaluate(f"fmnist class {c}", fmnist_sets(c, a.normal, a.test, a.seed),
                         a.k, stage_sets, a.side, a.sigma, a.seed)
    for photo in (0, 1) if "photo" in a.kinds else ():
        rows += evaluate(f"photo {('china', 'flower')[photo]}",
                         photo_sets(photo, a.normal, a.test, a.seed), a.k, stage_sets,
                         a.side, a.sigma, a.seed)
    print(f"{'images':<16} {'method':<40} {'pixel AUC':>9} {'PRO':>6} {'s/image':>8}")
    for r in rows:
        print(f"{r['images']:<16} {r['method']:<40} {r['pixel_auc']:9.3f} {r['pro']:6.3f} "
              f"{r['s_per_image']:8.2f}")
    for kind in ("fmnist", "photo"):
        by_method: dict[str, list[float]] = {}
        for r in rows:
            if r["images"].startswith(kind):
                by_method.setdefault(r["method"], []).append(r["pixel_auc"])
        for m, v in by_method.items():
            print(f"mean {kind:<11} {m:<40} {np.mean(v):9.3f}")


if __name__ == "__main__":
    main()
