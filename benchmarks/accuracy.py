"""DN2 one-class accuracy on the full protocol, from features embedded once.

Protocol (Bergman, Cohen & Hoshen 2020): each class in turn is normal (its first N
training images), every test image is scored, ROC-AUC with "not the normal class" as
positive and the DN2 score (mean distance to the k nearest normal features, higher =
more anomalous) as the decision value.

Datasets:
  fmnist   Fashion-MNIST (Debian's dataset-fashion-mnist): 6000 normal images per
           class, all 10000 test images (``--train-per-class 500 --test 2000`` is the
           quick protocol of benchmarks/fashion_mnist.py).
  digits   scikit-learn's load_digits, 8x8 upsampled 4x (nearest) to 32x32; the first
           60% of the 1797 images are the training split, the rest (719) the test set.

Every image of both splits is embedded ONCE per backbone (and once mirrored, for flip
TTA) by benchmarks/array_features.py (dn2's engine handler, the crops of ``dn2 embed``)
and cached under ``--cache``; every table below is computed from those features:

  treatments   per-class ROC-AUC of each feature treatment (dn2's --feature-transform
               none / l2 / sqrt-l2 / root4-l2, flip TTA, lite1, lite0+lite1 concatenated,
               dn2's default backbone (the composite efficientnet_lite0+efficientnet_lite1),
               mean-shift, PCA whitening), with its embedding and scoring cost per image
  k            k = 1, 2, 3, 5, 10 with the default treatment
  kmeans       K-means C = 1, 3, 5, 10 against exact kNN (dn2's --kmeans)
  few-shot     1, 10, 50, 100, 500, all normal images (random draws)
  impurities   5-20 % images of other classes in the normal set, without cleaning and
               with cleaning rules (the fraction of true impurities each removes)

    python benchmarks/accuracy.py embed --dataset fmnist [--backbones ...] [--hflip]
    python benchmarks/accuracy.py tables --dataset fmnist [--tables treatments,k,...]

Writes OUT/{dataset}-n{N}-t{M}/results.json and report.md (OUT: ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

from benchmarks import array_features  # noqa: E402
from benchmarks.markdown import fmt as _f  # noqa: E402
from benchmarks.markdown import table as _table  # noqa: E402
from dn2ops import transforms  # noqa: E402
from dn2ops.config import DEFAULT_BACKBONE  # noqa: E402

LOG = logging.getLogger("dn2.bench")
DEFAULT_CACHE = os.path.join("bench-out", "accuracy", "features")
DEFAULT_OUT = os.path.join("bench-out", "accuracy")
DEFAULT_NAME = "lite0+lite1 (dn2's default backbone)"
# dn2's defaults: --backbone DEFAULT_BACKBONE, --feature-transform transforms.DEFAULT
DEFAULT_TREATMENT = f"{DEFAULT_NAME}, {transforms.DEFAULT}"
TREATMENTS_K = ("none (the paper; dn2's old default)",)
TABLES = ("treatments", "k_sweep", "kmeans", "few_shot", "impurities", "curves")  # in order
CURVE_TREATMENTS = ("none (the paper; dn2's old default)", "sqrt-l2")  # beside the default
CURVE_LABELS = {CURVE_TREATMENTS[0]: "Lite0, none (the paper)",
                CURVE_TREATMENTS[1]: "Lite0, sqrt-l2 (previous default)",
                DEFAULT_TREATMENT: "default: Lite0+Lite1, root4-l2"}


@dataclasses.dataclass
class Dataset:
    """Grey uint8 images (n, H, W) with int labels (n,) indexing ``classes``."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: Sequence[str]
    full_train_per_class: int | None  # None: every training image of the class


def fashion_mnist() -> Dataset:
    from benchmarks.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    return Dataset("fmnist", xtr, ytr.astype(int), xte, yte.astype(int),
                   FASHION_MNIST_CLASSES, 6000)


def digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (np.kron(d.images, np.ones((4, 4))) * (255 / 16)).round().astype(np.uint8)
    cut = int(0.6 * len(images))
    return Dataset("digits", images[:cut], d.target[:cut].astype(int), images[cut:],
                   d.target[cut:].astype(int), [str(i) for i in range(10)], None)


DATASETS: dict[str, Callable[[], Dataset]] = {"fmnist": fashion_mnist, "digits": digits}


def _flip(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, :, ::-1])


def feature_name(dataset: str, backbone: str, split: str, hflip: bool = False) -> str:
    return os.path.join(dataset, backbone + ("-hflip" if hflip else ""), split)


def run_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Embeds both splits for every backbone (and mirrored, with --hflip); cached."""
    ds = DATASETS[args.dataset]()
    done = {}
    for backbone in args.backbones:
        for hflip in (False, True) if args.hflip else (False,):
            for split, images in (("test", ds.test_images), ("train", ds.train_images)):
                name = feature_name(ds.name, backbone, split, hflip)
                array_features.cached(args.cache, name, _flip(images) if hflip else images,
                                      backbone, engine=args.engine, batch_size=args.batch_size)
                done[name] = array_features.facts(args.cache, name)
    return done



# -- features and treatments ------------------------------------------------------


@dataclasses.dataclass
class Protocol:
    train_idx: dict[int, np.ndarray]  # class -> its first N indices into the train split
    test_idx: np.ndarray  # the first M test images
    test_labels: np.ndarray  # (M,)

    @property
    def sizes(self) -> tuple[int, int]:
        return min(len(i) for i in self.train_idx.values()), len(self.test_idx)


def select(ds: Dataset, train_per_class: int | None, test: int | None) -> Protocol:
    train_per_class = train_per_class or ds.full_train_per_class
    train_idx = {c: np.flatnonzero(ds.train_labels == c)[:train_per_class]
                 for c in range(len(ds.classes))}
    test_idx = np.arange(min(test or len(ds.test_labels), len(ds.test_labels)))
    return Protocol(train_idx, test_idx, ds.test_labels[test_idx])


@dataclasses.dataclass
class Split:
    """Raw features of every image of both splits: train (n, d), test (m, d) float32."""

    train: np.ndarray
    test: np.ndarray


def load_split(cache: str, dataset: str, backbone: str, hflip: bool = False) -> Split | None:
    paths = [os.path.join(cache, feature_name(dataset, backbone, s, hflip) + ".npy")
             for s in ("train", "test")]
    if not all(os.path.exists(p) for p in paths):
        return None
    return Split(*(np.load(p) for p in paths))


def embed_cost(cache: str, dataset: str, backbone: str, hflip: bool = False) -> float | None:
    """Seconds per image of the recorded embedding of both splits (None if not recorded)."""
    got = [array_features.facts(cache, feature_name(dataset, backbone, s, hflip))
           for s in ("train", "test")]
    if not all(got):
        return None
    return sum(f["seconds"] for f in got) / sum(f["images"] for f in got)


def _t(x: np.ndarray, name: str) -> np.ndarray:
    return transforms.apply(x, name)


def _mean(a: Split, b: Split) -> Split:
    return Split((a.train + b.train) / 2, (a.test + b.test) / 2)


def _each(s: Split, name: str) -> Split:
    return Split(_t(s.train, name), _t(s.test, name))


def _concat(a: Split, b: Split) -> Split:
    return Split(np.hstack([a.train, b.train]), np.hstack([a.test, b.test]))


def mean_shift(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normal set's mean subtracted, then unit length (Mean-Shifted Contrastive's test time)."""
    mu = train.mean(axis=0, dtype=np.float64).astype(np.float32)
    return _t(train - mu, "l2"), _t(test - mu, "l2")


def pca_whiten(train: np.ndarray, test: np.ndarray, shrink: float = 0.1
               ) -> tuple[np.ndarray, np.ndarray]:
    """Normal set's PCA, each component scaled by 1 / sqrt(variance + shrink x mean variance)
    (kNN in this space is Mahalanobis kNN with a shrunk covariance)."""
    mu = train.mean(axis=0, dtype=np.float64)
    xc = train - mu
    cov = xc.T @ xc / max(1, len(train) - 1)
    w, V = np.linalg.eigh(cov)
    w = np.maximum(w, 0)
    P = (V / np.sqrt(w + shrink * w.mean())).astype(np.float32)
    return ((train - mu) @ P).astype(np.float32), ((test - mu) @ P).astype(np.float32)


PerClass = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class Treatment:
    """Features for kNN: ``split`` (all images, transformed the same way for every class),
    then ``per_class`` (fitted on the normal set) if any; ``embed_s`` seconds per image."""

    name: str
    split: Split
    embed_s: float | None
    per_class: PerClass | None = None


def treatments(cache: str, dataset: str) -> tuple[list[Treatment], dict[str, str]]:
    """Every treatment whose features are cached; and {name: why not} for the others."""
    lite0 = load_split(cache, dataset, "efficientnet_lite0")
    if lite0 is None:
        raise FileNotFoundError(f"no efficientnet_lite0 features of {dataset} under {cache}: "
                                "run the embed step first")
    flip = load_split(cache, dataset, "efficientnet_lite0", hflip=True)
    lite1 = load_split(cache, dataset, "efficientnet_lite1")
    composite = load_split(cache, dataset, DEFAULT_BACKBONE)
    c0 = embed_cost(cache, dataset, "efficientnet_lite0")
    cf = embed_cost(cache, dataset, "efficientnet_lite0", hflip=True)
    c1 = embed_cost(cache, dataset, "efficientnet_lite1")
    out = [Treatment("none (the paper; dn2's old default)", lite0, c0),
           Treatment("l2", _each(lite0, "l2"), c0),
           Treatment("sqrt-l2", _each(lite0, "sqrt-l2"), c0),
           Treatment("root4-l2", _each(lite0, "root4-l2"), c0),
           Treatment("mean-shift + l2", lite0, c0, mean_shift),
           Treatment("sqrt-l2, then mean-shift + l2", _each(lite0, "sqrt-l2"), c0, mean_shift),
           Treatment("PCA whitening (shrunk covariance)", lite0, c0, pca_whiten)]
    missing = {}
    if flip is not None:
        both = _mean(lite0, flip)
        cost = c0 + cf if c0 and cf else None
        out += [Treatment("flip TTA, none", both, cost),
                Treatment("flip TTA, sqrt-l2", _each(both, "sqrt-l2"), cost)]
    else:
        missing["flip TTA"] = "mirrored images not embedded"
    if lite1 is not None:
        cost = c0 + c1 if c0 and c1 else None
        out += [Treatment("lite1, none", lite1, c1),
                Treatment("lite1, sqrt-l2", _each(lite1, "sqrt-l2"), c1),
                Treatment("lite1, root4-l2", _each(lite1, "root4-l2"), c1),
                Treatment("lite0 + lite1 concatenated, each sqrt-l2",
                          _concat(_each(lite0, "sqrt-l2"), _each(lite1, "sqrt-l2")), cost)]
        if flip is not None:
            out.append(Treatment("lite0 flip TTA + lite1 concatenated, each sqrt-l2",
                                 _concat(_each(_mean(lite0, flip), "sqrt-l2"),
                                         _each(lite1, "sqrt-l2")), cost + cf if cost else None))
    else:
        missing["efficientnet_lite1"] = "not embedded"
    if composite is not None:  # lite0 runs at lite1's 240 crop here, as in dn2
        cc = embed_cost(cache, dataset, DEFAULT_BACKBONE)
        out += [Treatment(f"{DEFAULT_NAME}, {t}", _each(composite, t), cc)
                for t in ("none", "sqrt-l2", "root4-l2")]
    else:
        missing[DEFAULT_BACKBONE] = "not embedded"
    return out, missing


def class_features(tr: Treatment, prot: Protocol, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(normal features (n, d), test features (m, d)) of class c under a treatment."""
    train, test = tr.split.train[prot.train_idx[c]], tr.split.test[prot.test_idx]
    return tr.per_class(train, test) if tr.per_class else (train, test)


# -- scoring ------------------------------------------------------------------------


def knn_scores(train: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """DN2 scores (m,) float64 of test (m, d) against train (n, d); higher = more anomalous.

    With n <= k normal images (few-shot) the score is the mean distance to all n.
    """
    from dn2ops.index.knn import knn

    D, _ = knn(test, train, min(k, len(train)))
    return D.mean(axis=1, dtype=np.float64)


def auc(labels: np.ndarray, normal: int, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels != normal, scores))


def summary(aucs: Sequence[float], **extra: Any) -> dict[str, Any]:
    return {"per_class": [round(a, 4) for a in aucs], "mean": round(float(np.mean(aucs)), 4),
            **extra}


def table_treatments(trs: list[Treatment], prot: Protocol, k: int) -> list[dict[str, Any]]:
    """Per-class ROC-AUC of each treatment, with embedding and scoring seconds per image."""
    rows = []
    for tr in trs:
        aucs, seconds = [], 0.0
        for c in prot.train_idx:
            t0 = time.perf_counter()
            train, test = class_features(tr, prot, c)
            scores = knn_scores(train, test, k)
            seconds += time.perf_counter() - t0
            aucs.append(auc(prot.test_labels, c, scores))
        n_test = len(prot.test_idx)
        rows.append(summary(aucs, treatment=tr.name, embed_ms_per_image=_ms(tr.embed_s),
                            score_ms_per_image=_ms(seconds / len(prot.train_idx) / n_test)))
        LOG.info("treatment %s: %.4f", tr.name, rows[-1]["mean"])
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 3)


def table_k(trs: list[Treatment], prot: Protocol, ks: Sequence[int] = (1, 2, 3, 5, 10)
            ) -> list[dict[str, Any]]:
    """Mean ROC-AUC at each k, one search of max(ks) neighbours per class and treatment."""
    from dn2ops.index.knn import knn

    rows = []
    for tr in trs:
        aucs = {k: [] for k in ks}
        for c in prot.train_idx:
            train, test = class_features(tr, prot, c)
            D, _ = knn(test, train, max(ks))
            for k in ks:
                aucs[k].append(auc(prot.test_labels, c, D[:, :k].mean(axis=1, dtype=np.float64)))
        rows.append({"treatment": tr.name, **{f"k={k}": summary(a) for k, a in aucs.items()}})
    return rows


def table_kmeans(tr: Treatment, prot: Protocol, k: int, cs: Sequence[int] = (1, 3, 5, 10)
                 ) -> list[dict[str, Any]]:
    """Exact kNN against distance to the nearest of C faiss K-means centres (dn2's --kmeans)."""
    from dn2ops.index.knn import kmeans_centroids, knn

    rows = []
    for C in (None, *cs):
        aucs, fit_s, score_s = [], 0.0, 0.0
        for c in prot.train_idx:
            train, test = class_features(tr, prot, c)
            t0 = time.perf_counter()
            base = train if C is None else kmeans_centroids(train, C)
            t1 = time.perf_counter()
            D, _ = knn(test, base, k if C is None else 1)
            score_s += time.perf_counter() - t1
            fit_s += t1 - t0
            aucs.append(auc(prot.test_labels, c, D.mean(axis=1, dtype=np.float64)))
        rows.append(summary(aucs, method=f"exact kNN, k={k}" if C is None else f"K-means C={C}",
                            score_ms_per_image=_ms(score_s / len(aucs) / len(prot.test_idx)),
                            fit_seconds_per_class=round(fit_s / len(aucs), 3)))
    return rows


def table_few_shot(tr: Treatment, prot: Protocol, k: int,
                   sizes: Sequence[int] = (1, 10, 50, 100, 500), draws: int = 5,
                   seed: int = 0) -> list[dict[str, Any]]:
    """ROC-AUC with n random normal images (mean over ``draws`` draws; all images: one)."""
    rng = np.random.default_rng(seed)
    n_all = prot.sizes[0]
    rows = []
    for n in [s for s in sizes if s < n_all] + [n_all]:
        aucs = []
        for c in prot.train_idx:
            idx = prot.train_idx[c]
            per_draw = []
            for _ in range(draws if n < len(idx) else 1):
                sub = dataclasses.replace(prot, train_idx={c: rng.choice(idx, n, replace=False)})
                train, test = class_features(tr, sub, c)
                per_draw.append(auc(prot.test_labels, c, knn_scores(train, test, k)))
            aucs.append(float(np.mean(per_draw)))
        rows.append(summary(aucs, n=n, draws=draws if n < n_all else 1))
        LOG.info("few-shot n=%d: %.4f", n, rows[-1]["mean"])
    return rows



# -- impurities and cleaning --------------------------------------------------------

# Cleaning rules: (name, neighbours of the leave-one-out score). dn2's rule until issue 16
# was k=2 (the scoring k). All come from one leave-one-out search per normal set.
CLEAN_RULES = (("dn2 before (k=2)", 2), ("k=50", 50), ("k=200 (dn2 now)", 200))
# Neighbours searched once per test image against the impure normal set; the k nearest
# KEPT ones are read from this list (rows that run out are searched again, exactly).
DEEP = 64


def clean_masks(X: np.ndarray, fraction: float, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """{k: kept mask (n,)}: each drops the round(fraction n) rows with the highest
    leave-one-out score (mean distance to the k nearest other rows), lower index first
    among ties (DN2Scorer's rule)."""
    from dn2ops.index.knn import knn_leave_one_out

    n = len(X)
    D, _ = knn_leave_one_out(X, min(max(ks), n - 1))
    masks = {}
    for k in ks:
        kept = np.ones(n, dtype=bool)
        loo = D[:, :k].mean(axis=1, dtype=np.float64)
        kept[np.argsort(-loo, kind="stable")[:round(fraction * n)]] = False
        masks[k] = kept
    return masks


def kept_scores(D: np.ndarray, I: np.ndarray, kept: np.ndarray, train: np.ndarray,
                test: np.ndarray, k: int) -> np.ndarray:
    """DN2 scores (m,) of test against train[kept], from a deeper search (D, I) (m, DEEP)
    of test against all of train: the first k kept neighbours of each row; rows with
    fewer than k kept among them are searched again against train[kept]."""
    ok = kept[I]
    take = ok & (np.cumsum(ok, axis=1) <= k)
    scores = (D * take).sum(axis=1, dtype=np.float64) / k
    short = np.flatnonzero(take.sum(axis=1) < k)
    if len(short):
        scores[short] = knn_scores(train[kept], test[short], k)
    return scores


def plot_curves(trs: list[Treatment], prot: Protocol, k: int, classes: Sequence[str],
                few_shot: list[dict[str, Any]] | None, out: str) -> dict[str, Any]:
    """ROC curves of each treatment, one panel a normal class (roc.png), and the few-shot
    curve of the default (few_shot.png), under ``out``; returns the files and the AUC of
    each curve (sklearn's ``auc`` of the plotted points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc as area
    from sklearn.metrics import roc_curve

    cols = 5
    rows = -(-len(prot.train_idx) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    aucs: dict[str, list[float]] = {tr.name: [] for tr in trs}
    for ax, c in zip(axes.flat, prot.train_idx, strict=False):
        for tr in trs:
            train, test = class_features(tr, prot, c)
            fpr, tpr, _ = roc_curve(prot.test_labels != c, knn_scores(train, test, k))
            aucs[tr.name].append(round(float(area(fpr, tpr)), 4))
            label = CURVE_LABELS.get(tr.name, tr.name)
            ax.plot(fpr, tpr, lw=1, label=f"{label} ({aucs[tr.name][-1]:.4f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.set_title(f"normal: {classes[c]}", fontsize=9)
        ax.legend(fontsize=5, loc="lower right")
    for ax in list(axes.flat)[len(prot.train_idx):]:
        ax.axis("off")
    fig.supxlabel("false positive rate (normal test images flagged)")
    fig.supylabel("true positive rate (anomalies flagged)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "roc.png"), dpi=110)
    plt.close(fig)
    files = ["roc.png"]
    if few_shot:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["n"] for r in few_shot], [r["mean"] for r in few_shot], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("normal images per class")
        ax.set_ylabel("mean ROC-AUC")
        ax.set_title(CURVE_LABELS.get(trs[-1].name, trs[-1].name), fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "few_shot.png"), dpi=110)
        plt.close(fig)
        files.append("few_shot.png")
    return {"files": files, "auc": aucs}


def table_impurities(tr: Treatment, prot: Protocol, train_labels: np.ndarray, k: int,
                     rates: Sequence[float] = (0.05, 0.10, 0.15, 0.20),
                     rules: Sequence[tuple[str, int]] = CLEAN_RULES, seed: int = 0
                     ) -> list[dict[str, Any]]:
    """Normal set = the class's images + round(p n / (1 - p)) random training images of the
    other classes (so a fraction p is impure). Mean ROC-AUC without cleaning and after
    each cleaning rule at the true rate, and the fraction of impurities each rule removed."""
    from dn2ops.index.knn import knn

    rng = np.random.default_rng(seed)
    rows = []
    for p in rates:
        aucs = {"no cleaning": []}
        removed = {name: [] for name, _ in rules}
        for c, idx in prot.train_idx.items():
            others = np.flatnonzero(train_labels != c)
            bad = rng.choice(others, round(p * len(idx) / (1 - p)), replace=False)
            mixed = dataclasses.replace(prot, train_idx={c: np.concatenate([idx, bad])})
            train, test = class_features(tr, mixed, c)
            impure = np.arange(len(train)) >= len(idx)
            D, I = knn(test, train, min(DEEP, len(train)))
            aucs["no cleaning"].append(
                auc(prot.test_labels, c, D[:, :k].mean(axis=1, dtype=np.float64)))
            masks = clean_masks(train, p, [clean_k for _, clean_k in rules])
            for name, clean_k in rules:
                kept = masks[clean_k]
                removed[name].append(float((~kept & impure).sum() / impure.sum()))
                aucs.setdefault(name, []).append(
                    auc(prot.test_labels, c, kept_scores(D, I, kept, train, test, k)))
        row = {"impurity": p, "no cleaning": summary(aucs.pop("no cleaning"))}
        for name in removed:
            row[name] = summary(aucs[name], removed=round(float(np.mean(removed[name])), 3))
        rows.append(row)
        LOG.info("impurities %.2f: %s", p, {n: (v["mean"], v.get("removed"))
                                            for n, v in row.items() if isinstance(v, dict)})
    return rows


# -- the run ------------------------------------------------------------------------


def run_tables(args: argparse.Namespace) -> dict[str, Any]:
    ds = DATASETS[args.dataset]()
    prot = select(ds, args.train_per_class, args.test)
    trs, missing = treatments(args.cache, ds.name)
    by_name = {t.name: t for t in trs}
    if DEFAULT_TREATMENT not in by_name:
        raise FileNotFoundError(f"dn2's default backbone {DEFAULT_BACKBONE} is not embedded "
                                f"under {args.cache}: run the embed step with it")
    default = by_name[DEFAULT_TREATMENT]
    n, m = prot.sizes
    res: dict[str, Any] = {"dataset": ds.name, "classes": list(ds.classes),
                           "train_per_class": n, "test": m, "k": args.k,
                           "default_treatment": DEFAULT_TREATMENT,
                           "not_measured": missing, "embedding": _embedding(args.cache, ds.name)}
    steps = {
        "treatments": lambda: table_treatments(trs, prot, args.k),
        "k_sweep": lambda: table_k([by_name[TREATMENTS_K[0]], default], prot),
        "kmeans": lambda: table_kmeans(default, prot, args.k),
        "few_shot": lambda: table_few_shot(default, prot, args.k),
        "impurities": lambda: table_impurities(default, prot, ds.train_labels, args.k),
        "curves": lambda: plot_curves(
            [by_name[t] for t in CURVE_TREATMENTS] + [default], prot, args.k, ds.classes,
            res.get("few_shot"), out),
    }
    out = os.path.join(args.out, f"{ds.name}-n{n}-t{m}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    if os.path.exists(path):  # tables computed by an earlier run and not this one are kept
        with open(path) as f:
            old = json.load(f)
        res = {**old, **res, "seconds": old.get("seconds", {})}
    res.setdefault("seconds", {})
    for name in [t for t in TABLES if t in args.tables]:  # written after every table
        t0 = time.perf_counter()
        res[name] = steps[name]()
        res["seconds"][name] = round(time.perf_counter() - t0, 1)
        res["wall_seconds"] = round(sum(res["seconds"].values()), 1)
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
        text = render(res)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(text)
    print(text)
    return res


def _embedding(cache: str, dataset: str) -> dict[str, Any]:
    got = {}
    for backbone in ("efficientnet_lite0", "efficientnet_lite1", DEFAULT_BACKBONE):
        for hflip in (False, True):
            for split in ("train", "test"):
                name = feature_name(dataset, backbone, split, hflip)
                f = array_features.facts(cache, name)
                if f:
                    got[name] = f
    return got


# -- report -------------------------------------------------------------------------


def render(res: dict[str, Any]) -> str:
    """The report's markdown: one table per computed step."""
    classes = res["classes"]
    out = [f"# DN2 one-class accuracy: {res['dataset']}, {res['train_per_class']} normal images "
           f"per class, {res['test']} test images, k={res['k']}", "",
           f"Default treatment (dn2's defaults, `--backbone {DEFAULT_BACKBONE} "
           f"--feature-transform {transforms.DEFAULT}`): `{res['default_treatment']}`."
           f" Tables computed in {res['wall_seconds']:.0f} s (from the cached features); "
           f"seconds per table: {res['seconds']}.", ""]
    if res.get("embedding"):
        out += ["## Embedding (dn2's engine handler, cached features)", "",
                _table(["features", "images", "seconds", "images/s", "engine", "batch",
                        "threads"],
                       [[n, f["images"], f["seconds"], f["images_per_second"], f["engine"],
                         f["batch_size"], f["threads"]] for n, f in res["embedding"].items()]),
                ""]
    if res.get("not_measured"):
        out += ["Not measured: " + "; ".join(f"{k}: {v}" for k, v in
                                              res["not_measured"].items()), ""]
    if "treatments" in res:
        out += ["## Treatments: per-class ROC-AUC", "",
                _table(["treatment", "mean", *classes, "embed ms/image", "score ms/image"],
                       [[r["treatment"], f"**{_f(r['mean'])}**", *map(_f, r["per_class"]),
                         _f(r["embed_ms_per_image"], 2), _f(r["score_ms_per_image"], 3)]
                        for r in res["treatments"]]), "",
                "Embedding ms/image: the recorded embedding of both splits (flip TTA and "
                "concatenations add their parts); scoring ms/image: transform + exact kNN "
                "search of the test set against one class's normal set, per test image.", ""]
    if "k_sweep" in res:
        ks = [key for key in res["k_sweep"][0] if key.startswith("k=")]
        out += ["## k", "", _table(["treatment", *ks],
                                   [[r["treatment"], *(_f(r[key]["mean"]) for key in ks)]
                                    for r in res["k_sweep"]]), ""]
    if "kmeans" in res:
        out += ["## K-means against exact kNN (default treatment)", "",
                _table(["method", "mean", *classes, "score ms/image", "K-means s/class"],
                       [[r["method"], f"**{_f(r['mean'])}**", *map(_f, r["per_class"]),
                         _f(r["score_ms_per_image"], 3), r["fit_seconds_per_class"]]
                        for r in res["kmeans"]]), ""]
    if "few_shot" in res:
        out += ["## Few-shot (default treatment)", "",
                _table(["normal images", "draws", "mean", *classes],
                       [[r["n"], r["draws"], f"**{_f(r['mean'])}**", *map(_f, r["per_class"])]
                        for r in res["few_shot"]]), ""]
    if "impurities" in res:
        rules = [key for key in res["impurities"][0] if key not in ("impurity", "no cleaning")]
        out += ["## Impurities (default treatment; cleaning at the true rate)", "",
                _table(["impurity", "no cleaning", *(f"{r}: AUC / removed" for r in rules)],
                       [[f"{r['impurity']:.0%}", _f(r["no cleaning"]["mean"]),
                         *(f"{_f(r[x]['mean'])} / {r[x]['removed']:.0%}" for x in rules)]
                        for r in res["impurities"]]), "",
                "removed = the fraction of the planted impurities that the rule dropped "
                "(mean over classes).", ""]
    if "curves" in res:
        out += ["## Curves", "", "ROC curves, one panel a normal class (AUC in the legend):",
                "", "![ROC curves](roc.png)", ""]
        if "few_shot.png" in res["curves"]["files"]:
            out += ["Few-shot (default treatment):", "", "![few-shot](few_shot.png)", ""]
    return "\n".join(out) + "\n"


# -- command line -----------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("embed", "tables"))
    p.add_argument("--dataset", choices=sorted(DATASETS), default="fmnist")
    p.add_argument("--backbones", default=f"efficientnet_lite0,{DEFAULT_BACKBONE}",
                   help="embed: comma-separated backbones to embed")
    p.add_argument("--hflip", action="store_true", help="embed: also the mirrored images")
    p.add_argument("--engine", default="auto", help="embed: dn2 engine (auto: ONNX Runtime)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--train-per-class", type=int, default=None,
                   help="normal images per class (default: the full protocol)")
    p.add_argument("--test", type=int, default=None, help="first M test images (default: all)")
    p.add_argument("--tables", default=",".join(TABLES),
                   help=f"comma-separated tables to compute, of {','.join(TABLES)}")
    p.add_argument("--k", type=int, default=2)
    args = p.parse_args(argv)
    args.backbones = [b for b in args.backbones.split(",") if b]
    args.tables = [t for t in args.tables.split(",") if t]
    unknown = set(args.tables) - set(TABLES)
    if unknown:
        p.error(f"unknown tables {sorted(unknown)}; choose from {TABLES}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)
    if args.step == "embed":
        done = run_embed(args)
        print(json.dumps(done, indent=2))
        return done
    return run_tables(args)


if __name__ == "__main__":
    main()
