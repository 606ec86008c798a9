"""DN2 accuracy on Fashion-MNIST through the dn2 pipeline, against the paper.

Protocol (Bergman, Cohen & Hoshen 2020, one-class): each of the 10 classes in
turn is normal (its first N training images); the first M test images (all
classes) are scored; ROC-AUC with "not the normal class" as the positive
label and the DN2 score (higher = more anomalous) as the decision value.

Sizes:
  full      --train-per-class 6000 --test 10000  (the paper's protocol)
  --quick   --train-per-class 500  --test 2000   (routine runs; default)
Few-shot "all" = every embedded training image of the class (500 in quick mode).

What goes through the pipeline and what does not:
  * The images are written as PNG files (benchmarks.datasets.write_png_store) with
    CSV manifests carrying ``id``, ``label`` and ``class`` columns, and embedded
    ONCE per (split, backbone, treatment) with ``dn2 embed`` (pipelines.cli.main).
  * Table 1 (exact kNN, the headline) runs ``dn2 build-index`` and
    ``dn2 score --features`` for every class; its ROC-AUC is computed from the
    written ``anomalies-*.parquet`` table (label from the carried manifest column).
  * The sweeps (K-means, few-shot, impurities, k, backbones, feature treatments)
    score the pipeline's feature shards (dn2ops.io.features.load_features) with
    dn2ops.score.estimator.DN2Scorer, the estimator that ``dn2 build-index`` wraps.

Cache layout (default ``bench-out/fmnist/``; reused between runs, never re-embedded
when a features directory has its ``_SUCCESS`` marker):
  store/train/{c}/{i:05d}.png       training image i (index in the train split) of class c
  store/test/{i:05d}.png            test image i
  store/train-c{c}-n{N}.csv         manifest: first N training images of class c
  store/test-n{M}.csv               manifest: first M test images
                                    (columns uri, id, label, class; uris relative)
  store-hflip/...                   the same, every image mirrored left-right
  features/{backbone}/train-c{c}-n{N}/    dn2 feature shards of each manifest
  features/{backbone}/test-n{M}/
  features/{backbone}-hflip/...     the mirrored store's features (flip TTA)

Output folder (default ``bench-out/fmnist/report-n{N}-t{M}/``): report.md,
results.json, one PNG plot per table, and pipeline/ (the indexes and results of
table 1).

    python benchmarks/fashion_mnist.py --quick                      # embed if needed, report
    python benchmarks/fashion_mnist.py --quick --embed-only         # embed only
    python benchmarks/fashion_mnist.py --train-per-class 6000 --test 10000   # full protocol
    python benchmarks/fashion_mnist.py --quick \\
        --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2
    python benchmarks/fashion_mnist.py --quick --hflip-train-per-class 50 --hflip-test 500

Flip test-time averaging needs the mirrored store embedded too; on a slow CPU
``--hflip-train-per-class N --hflip-test M`` embeds only a subset, and the report
then compares raw, L2 and flip-averaged features on that same subset.
``--no-hflip`` skips it. The sizes a small store cannot support (k >= n,
C > n, few-shot n > embedded) are reported as n/a, never faked.
Tested end to end on a tiny digits store by tests/benchmarks/test_fashion_mnist_bench.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

from benchmarks.baselines import render_markdown, run_baselines  # noqa: E402
from benchmarks.datasets import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    write_manifest,
    write_png_store,
)
from benchmarks.markdown import fmt as _f  # noqa: E402
from benchmarks.markdown import table as _table  # noqa: E402
from dn2ops import transforms  # noqa: E402
from dn2ops.index.knn import knn  # noqa: E402
from dn2ops.io import features as features_mod  # noqa: E402
from dn2ops.io import outputs  # noqa: E402
from dn2ops.score.estimator import DN2Scorer  # noqa: E402

LOG = logging.getLogger("dn2.bench")

QUICK_TRAIN, QUICK_TEST = 500, 2000
FULL_TRAIN, FULL_TEST = 6000, 10000
DEFAULT_BACKBONES = ("efficientnet_lite0",)
KMEANS_C = (1, 3, 5, 10)
FEW_SHOT = (1, 10, 50, 100, 500, 1000, None)  # None = all embedded images of the class
IMPURITY = (0.0, 0.05, 0.10, 0.15, 0.20)
K_SWEEP = (1, 2, 5, 10, 20)
PAPER = {
    "fmnist_mean_resnet101": "about 94-95 (DN2, ResNet-101)",
    "cifar10_exact": 92.52,
    "cifar10_kmeans": {1: 91.94, 3: 92.00, 5: 91.87, 10: 91.64},
}


# -- data ---------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    """Images uint8 (N, H, W), labels int (N,) indexing ``classes``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: Sequence[str]


def fashion_mnist() -> Dataset:
    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    return Dataset(xtr, ytr.astype(int), xte, yte.astype(int), FASHION_MNIST_CLASSES)


@dataclasses.dataclass
class Protocol:
    train_per_class: int
    test: int
    train_idx: dict[int, np.ndarray]  # class -> indices into the train split (first N)
    test_idx: np.ndarray  # indices into the test split (first M)


def select(ds: Dataset, train_per_class: int, test: int) -> Protocol:
    classes = range(len(ds.classes))
    train_idx = {c: np.flatnonzero(ds.train_labels == c)[:train_per_class] for c in classes}
    short = {c: len(i) for c, i in train_idx.items() if len(i) < train_per_class}
    if short:
        raise ValueError(f"classes with fewer than {train_per_class} training images: {short}")
    if test > len(ds.test_labels):
        raise ValueError(f"--test {test} > {len(ds.test_labels)} test images")
    return Protocol(train_per_class, test, train_idx, np.arange(test))


def _flip(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, :, ::-1])


def write_store(cache: str, ds: Dataset, prot: Protocol, *, hflip: bool = False
                ) -> dict[str, str]:
    """PNG store + manifests for the protocol. Returns {set name: manifest path}.

    Set names: ``train-c{c}`` for every class, ``test``. Idempotent (the PNG
    writer skips files that are already there).
    """
    root = os.path.join(cache, "store-hflip" if hflip else "store")
    prep = _flip if hflip else (lambda x: x)
    manifests = {}
    for c, idx in prot.train_idx.items():
        names = [f"train/{c}/{i:05d}" for i in idx]
        write_png_store(prep(ds.train_images[idx]), names, root)
        path = os.path.join(root, f"train-c{c}-n{prot.train_per_class}.csv")
        write_manifest([{"uri": f"{n}.png", "id": n, "label": c, "class": ds.classes[c]}
                        for n in names], path)
        manifests[f"train-c{c}"] = path
    names = [f"test/{i:05d}" for i in prot.test_idx]
    labels = ds.test_labels[prot.test_idx]
    write_png_store(prep(ds.test_images[prot.test_idx]), names, root)
    path = os.path.join(root, f"test-n{prot.test}.csv")
    write_manifest([{"uri": f"{n}.png", "id": n, "label": int(y), "class": ds.classes[y]}
                    for n, y in zip(names, labels, strict=True)], path)
    manifests["test"] = path
    return manifests


def features_dir(cache: str, treatment: str, set_name: str, prot: Protocol) -> str:
    size = prot.test if set_name == "test" else prot.train_per_class
    return os.path.join(cache, "features", treatment, f"{set_name}-n{size}")


def _dn2(argv: list[str]) -> None:
    from pipelines.cli import main

    code = main(argv)
    if code != 0:
        raise RuntimeError(f"dn2 {' '.join(argv)} exited with {code}")


def embed_sets(cache: str, manifests: dict[str, str], backbone: str, treatment: str,
               prot: Protocol, extra_args: Sequence[str] = ()) -> dict[str, dict]:
    """``dn2 embed`` every manifest not embedded yet. Returns {set name: features marker}."""
    markers = {}
    for set_name, manifest in manifests.items():
        out = features_dir(cache, treatment, set_name, prot)
        marker = outputs.read_marker(out)
        if marker is None or marker.get("kind") != features_mod.KIND:
            LOG.info("embedding %s with %s -> %s", manifest, backbone, out)
            _dn2(["embed", "--input", manifest, "--output", out, "--backbone", backbone,
                  *extra_args])
            marker = outputs.read_marker(out)
        if marker.get("errored"):
            raise RuntimeError(f"{out}: {marker['errored']} images failed to embed")
        markers[set_name] = marker
    return markers


def load_set(directory: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n,) str, labels (n,) int, features (n, dim) float32), sorted by id."""
    table, X, _ = features_mod.load_features(directory)
    ids = np.array(table.column("id").to_pylist())
    labels = np.array([int(v) for v in table.column("label").to_pylist()])
    order = np.argsort(ids, kind="stable")
    return ids[order], labels[order], X[order]


# -- features of one treatment ----------------------------------------------------


@dataclasses.dataclass
class Features:
    """One feature treatment: normal training features per class and the test set.

    ``train[c]`` (n_c, d) float32 in id order; ``test`` (m, d) with ``test_labels`` (m,).
    """

    train: dict[int, np.ndarray]
    test: np.ndarray
    test_labels: np.ndarray
    train_ids: dict[int, np.ndarray]
    test_ids: np.ndarray

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> Features:
        return dataclasses.replace(self, train={c: fn(x) for c, x in self.train.items()},
                                   test=fn(self.test))


def load_treatment(cache: str, treatment: str, prot: Protocol) -> Features:
    train, train_ids = {}, {}
    for c in prot.train_idx:
        ids, labels, X = load_set(features_dir(cache, treatment, f"train-c{c}", prot))
        if not (labels == c).all():
            raise ValueError(f"{treatment} train-c{c}: labels other than {c}")
        train[c], train_ids[c] = X, ids
    ids, labels, X = load_set(features_dir(cache, treatment, "test", prot))
    return Features(train, X, labels, train_ids, ids)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm, (n, d) float32 (dn2's --feature-transform l2)."""
    return transforms.apply(x, "l2")


def sqrt_l2(x: np.ndarray) -> np.ndarray:
    """Signed square root, then L2, (n, d) float32 (dn2's --feature-transform sqrt-l2)."""
    return transforms.apply(x, "sqrt-l2")


def combine(parts: Sequence[Features], how: str) -> Features:
    """``mean`` (flip test-time averaging) or ``concat`` of aligned treatments."""
    first = parts[0]
    for f in parts[1:]:  # rows are aligned by image id, never by position alone
        assert all((f.train_ids[c] == first.train_ids[c]).all() for c in first.train)
        assert (f.test_ids == first.test_ids).all()
    op = ((lambda xs: np.mean(xs, axis=0, dtype=np.float64).astype(np.float32)) if how == "mean"
          else (lambda xs: np.hstack(xs)))
    return dataclasses.replace(first,
                               train={c: op([f.train[c] for f in parts]) for c in first.train},
                               test=op([f.test for f in parts]))


# -- scoring --------------------------------------------------------------------


def dn2_scores(train: np.ndarray, test: np.ndarray, k: int, **kw: Any) -> np.ndarray:
    """DN2 scores (m,) of test (m, d) against train (n, d); higher = more anomalous.

    With n <= k normal images (few-shot) the score is the mean distance to all n:
    DN2Scorer needs k + 1 images for its leave-one-out reference scores.
    """
    if len(train) <= k and not kw:
        D, _ = knn(test, train, len(train))
        return D.mean(axis=1, dtype=np.float64)
    return DN2Scorer(k=k, **kw).fit(train).score_samples(test)


def auc(labels: np.ndarray, normal_class: int, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels != normal_class, scores))


def per_class_auc(f: Features, k: int, **kw: Any) -> list[float]:
    return [auc(f.test_labels, c, dn2_scores(f.train[c], f.test, k, **kw)) for c in f.train]


def summary(aucs: Sequence[float]) -> dict[str, Any]:
    return {"per_class": [round(a, 6) for a in aucs], "mean": round(float(np.mean(aucs)), 6)}


def table_pipeline(args: argparse.Namespace, prot: Protocol, treatment: str,
                   classes: Sequence[str], feature_transform: str = "none") -> dict[str, Any]:
    """Table 1: ``dn2 build-index`` + ``dn2 score --features`` per class, AUC from the table."""
    test_dir = features_dir(args.cache, treatment, "test", prot)
    base = os.path.join(args.out, "pipeline", treatment, feature_transform)
    aucs, seconds, rows = [], [], []
    for c in prot.train_idx:
        t0 = time.perf_counter()
        index, results = os.path.join(base, f"index-c{c}"), os.path.join(base, f"results-c{c}")
        _dn2(["build-index", "--features", features_dir(args.cache, treatment, f"train-c{c}", prot),
              "--output", index, "--k", str(args.k), "--feature-transform", feature_transform])
        _dn2(["score", "--features", test_dir, "--index", index, "--output", results])
        seconds.append(time.perf_counter() - t0)
        table = features_mod.read_table(results, "anomalies", columns=["label", "score"])
        labels = np.array([int(v) for v in table.column("label").to_pylist()])
        if len(labels) != prot.test:
            raise RuntimeError(f"{results}: {len(labels)} rows scored, expected {prot.test}")
        aucs.append(auc(labels, c, table.column("score").to_numpy()))
        rows.append({"class": classes[c], "results": results})
        LOG.info("pipeline class %d (%s): ROC-AUC %.4f", c, classes[c], aucs[-1])
    return {**summary(aucs), "results_dirs": [r["results"] for r in rows],
            "build_and_score_seconds": [round(s, 2) for s in seconds]}


def _time_scoring(scorer: DN2Scorer, test: np.ndarray, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds for scoring the whole test set once."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        scorer.score_samples(test)
        best = min(best, time.perf_counter() - t0)
    return best


def table_kmeans(f: Features, k: int) -> list[dict[str, Any]]:
    """Table 2: exact kNN vs K-means with C centres; AUC and scoring time per query."""
    rows = []
    for c_count in (None, *KMEANS_C):
        n_min = min(len(x) for x in f.train.values())
        if c_count is not None and c_count > n_min:
            rows.append({"method": f"kmeans C={c_count}", "C": c_count, "mean": None,
                         "skipped": f"C > {n_min} normal images"})
            continue
        aucs, fit_s, score_s = [], 0.0, 0.0
        for c, train in f.train.items():
            t0 = time.perf_counter()
            scorer = DN2Scorer(k=k, n_centroids=c_count).fit(train)
            fit_s += time.perf_counter() - t0
            aucs.append(auc(f.test_labels, c, scorer.score_samples(f.test)))
            score_s += _time_scoring(scorer, f.test)
        rows.append({"method": "exact kNN" if c_count is None else f"kmeans C={c_count}",
                     "C": c_count, **summary(aucs),
                     "fit_seconds_per_class": round(fit_s / len(f.train), 4),
                     "score_us_per_query": round(1e6 * score_s / (len(f.train) * len(f.test)), 3)})
    return rows


def table_few_shot(f: Features, k: int, repeats: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Table 3: mean AUC with n random normal images per class (mean over ``repeats`` draws)."""
    rng = np.random.default_rng(seed)
    n_all = min(len(x) for x in f.train.values())
    rows = []
    for n in FEW_SHOT:
        label = "all" if n is None else str(n)
        if n is not None and n > n_all:
            rows.append({"n": label, "mean": None, "skipped": f"only {n_all} embedded per class"})
            continue
        size = n_all if n is None else n
        draws = 1 if size == n_all else repeats
        means = []
        for _ in range(draws):
            aucs = [auc(f.test_labels, c, dn2_scores(
                train[rng.choice(len(train), size, replace=False)], f.test, k))
                for c, train in f.train.items()]
            means.append(float(np.mean(aucs)))
        rows.append({"n": label, "images": size, "draws": draws,
                     "mean": round(float(np.mean(means)), 6),
                     "std_over_draws": round(float(np.std(means)), 6)})
    return rows


def table_impurities(f: Features, k: int, seed: int = 0) -> list[dict[str, Any]]:
    """Table 4: normal set contaminated with a fraction p of other classes' training images.

    All n images of the class are kept and m = round(p n / (1 - p)) images drawn at
    random from the other classes' training images are added, so p of the set is
    impure. Cleaning drops the fraction p with the highest leave-one-out score
    (DN2Scorer clean_fraction=p: the contamination rate is assumed known).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for p in IMPURITY:
        plain, cleaned, removed_impure = [], [], []
        for c, train in f.train.items():
            others = np.concatenate([x for o, x in f.train.items() if o != c])
            m = round(p * len(train) / (1 - p))
            mixed = np.concatenate([train, others[rng.choice(len(others), m, replace=False)]])
            plain.append(auc(f.test_labels, c, dn2_scores(mixed, f.test, k)))
            if p > 0:
                scorer = DN2Scorer(k=k, clean_fraction=p).fit(mixed)
                cleaned.append(auc(f.test_labels, c, scorer.score_samples(f.test)))
                # share of the dropped images that really were impurities
                dropped = ~scorer.kept_mask_
                removed_impure.append(float(dropped[len(train):].sum() / max(dropped.sum(), 1)))
            else:
                cleaned.append(plain[-1])
        rows.append({"impurity": p, "without_cleaning": summary(plain),
                     "with_cleaning": summary(cleaned),
                     "dropped_that_were_impure": (round(float(np.mean(removed_impure)), 4)
                                                  if removed_impure else None)})
    return rows


def table_k(f: Features) -> list[dict[str, Any]]:
    """Table 5: exact kNN with k neighbours averaged; as embedded, L2 and sqrt + L2."""
    n_min = min(len(x) for x in f.train.values())
    l2f, sqf = f.map(l2_normalize), f.map(sqrt_l2)
    return [({"k": k, **summary(per_class_auc(f, k)), "l2": summary(per_class_auc(l2f, k)),
              "sqrt_l2": summary(per_class_auc(sqf, k))} if k <= n_min - 1
             else {"k": k, "mean": None, "skipped": f"k > {n_min - 1}"}) for k in K_SWEEP]


def subset(f: Features, n: int, m: int) -> Features:
    """The first n normal images per class (ids are zero-padded split indices) and m tests."""
    return Features({c: x[:n] for c, x in f.train.items()}, f.test[:m], f.test_labels[:m],
                    {c: i[:n] for c, i in f.train_ids.items()}, f.test_ids[:m])


def table_treatments(feats: dict[str, Features], backbones: Sequence[str], k: int,
                     hflip_sizes: tuple[int, int] | None) -> list[dict[str, Any]]:
    """Table 7: feature treatments of the headline backbone, and backbone concatenations."""
    head = backbones[0]
    base = feats[head]
    rows = [{"treatment": f"{head} (as embedded)", **summary(per_class_auc(base, k))},
            {"treatment": f"{head} L2-normalized",
             **summary(per_class_auc(base.map(l2_normalize), k))},
            {"treatment": f"{head} sqrt + L2 (power-normalized)",
             **summary(per_class_auc(base.map(sqrt_l2), k))}]
    flip_name = head + "-hflip"
    if flip_name in feats:
        n, m = hflip_sizes
        sub = subset(base, n, m)
        tta = combine([sub, feats[flip_name]], "mean")
        size = f" [{n}/class, {m} tests]" if (n, m) != (len(base.train[0]), len(base.test)) \
            else ""
        if size:  # the flip store is a smaller subset: compare on that subset
            rows.append({"treatment": f"{head}{size}", "subset": [n, m],
                         **summary(per_class_auc(sub, k))})
            rows.append({"treatment": f"{head} L2-normalized{size}", "subset": [n, m],
                         **summary(per_class_auc(sub.map(l2_normalize), k))})
            rows.append({"treatment": f"{head} sqrt + L2{size}", "subset": [n, m],
                         **summary(per_class_auc(sub.map(sqrt_l2), k))})
        rows.append({"treatment": f"{head} + hflip TTA{size}", "subset": [n, m],
                     **summary(per_class_auc(tta, k))})
        rows.append({"treatment": f"{head} + hflip TTA, L2-normalized{size}", "subset": [n, m],
                     **summary(per_class_auc(tta.map(l2_normalize), k))})
        rows.append({"treatment": f"{head} + hflip TTA, sqrt + L2{size}", "subset": [n, m],
                     **summary(per_class_auc(tta.map(sqrt_l2), k))})
    others = [b for b in backbones[1:] if b in feats]
    for combo in [[head, o] for o in others] + ([backbones] if len(others) > 1 else []):
        parts = [feats[b].map(l2_normalize) for b in combo]
        rows.append({"treatment": " + ".join(combo) + " concatenated, each L2-normalized",
                     **summary(per_class_auc(combine(parts, "concat"), k))})
        parts = [feats[b].map(sqrt_l2) for b in combo]
        rows.append({"treatment": " + ".join(combo) + " concatenated, each sqrt + L2",
                     **summary(per_class_auc(combine(parts, "concat"), k))})
        rows.append({"treatment": " + ".join(combo) + " concatenated, raw",
                     **summary(per_class_auc(combine([feats[b] for b in combo], "concat"), k))})
    return rows


def table_backbones(feats: dict[str, Features], backbones: Sequence[str], k: int,
                    embedding: dict[str, Any]) -> list[dict[str, Any]]:
    """Table 6: each embedded backbone, as embedded and L2-normalized."""
    rows = []
    for b in backbones:
        if b not in feats:
            continue
        rows.append({"backbone": b, "raw": summary(per_class_auc(feats[b], k)),
                     "l2": summary(per_class_auc(feats[b].map(l2_normalize), k)),
                     "images_per_second": embedding.get(b, {}).get("images_per_second")})
    return rows


# -- plots and report ---------------------------------------------------------------


PAPER_FMNIST_MEAN = 0.945  # middle of the paper's "about 94-95"


def _plot(path: str, draw: Callable[[Any], None], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.basename(path)


def _paper_line(ax: Any) -> None:
    ax.axhline(PAPER_FMNIST_MEAN, color="gray", ls="--", lw=1,
               label="paper DN2 ResNet-101 (~0.945)")


def write_plots(out: str, res: dict[str, Any], classes: Sequence[str]) -> list[str]:
    files = []
    t1 = res["table1_pipeline"]

    def per_class(ax):
        ax.bar(range(len(classes)), t1["per_class"])
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.axhline(t1["mean"], color="C1", label=f"dn2 mean {t1['mean']:.4f}")
        _paper_line(ax)
        ax.set_ylim(min(min(t1["per_class"]) - 0.05, 0.85), 1.0)
        ax.set_ylabel("ROC-AUC")
        ax.legend(fontsize=8)
    files.append(_plot(os.path.join(out, "1_one_class_per_class.png"), per_class,
                       "One-class ROC-AUC per normal class (dn2 build-index + score)"))

    def kmeans(ax):
        rows = [r for r in res["table2_kmeans"] if r["mean"] is not None]
        names = [r["method"] for r in rows]
        ax.bar(names, [r["mean"] for r in rows], color="C0")
        ax.set_ylim(min(r["mean"] for r in rows) - 0.02, 1.0)
        ax.set_ylabel("mean ROC-AUC", color="C0")
        ax2 = ax.twinx()
        ax2.plot(names, [r["score_us_per_query"] for r in rows], "o-", color="C3")
        ax2.set_ylabel("scoring µs / query", color="C3")
    files.append(_plot(os.path.join(out, "2_kmeans_vs_exact.png"), kmeans,
                       "K-means approximation vs exact kNN"))

    def few(ax):
        rows = [r for r in res["table3_few_shot"] if r["mean"] is not None]
        ax.errorbar([r["images"] for r in rows], [r["mean"] for r in rows],
                    yerr=[r["std_over_draws"] for r in rows], marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel("normal training images per class")
        ax.set_ylabel("mean ROC-AUC")
        _paper_line(ax)
        ax.legend(fontsize=8)
    files.append(_plot(os.path.join(out, "3_few_shot.png"), few, "Few-shot"))

    def impure(ax):
        rows = res["table4_impurities"]
        x = [100 * r["impurity"] for r in rows]
        ax.plot(x, [r["without_cleaning"]["mean"] for r in rows], "o-", label="without cleaning")
        ax.plot(x, [r["with_cleaning"]["mean"] for r in rows], "s-", label="with cleaning")
        ax.set_xlabel("% of the normal set from other classes")
        ax.set_ylabel("mean ROC-AUC")
        ax.legend(fontsize=8)
    files.append(_plot(os.path.join(out, "4_impurities.png"), impure,
                       "Contaminated normal set"))

    def ks(ax):
        rows = [r for r in res["table5_k"] if r["mean"] is not None]
        ax.plot([r["k"] for r in rows], [r["mean"] for r in rows], "o-", label="as embedded")
        ax.plot([r["k"] for r in rows], [r["l2"]["mean"] for r in rows], "s-", label="L2")
        ax.plot([r["k"] for r in rows], [r["sqrt_l2"]["mean"] for r in rows], "^-",
                label="sqrt + L2")
        _paper_line(ax)
        ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xticks([r["k"] for r in rows], [str(r["k"]) for r in rows])
        ax.set_xlabel("k (neighbours averaged)")
        ax.set_ylabel("mean ROC-AUC")
    files.append(_plot(os.path.join(out, "5_k.png"), ks, "Number of neighbours k"))

    def bars(ax, names, values):
        ax.barh(range(len(names)), values)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlim(min(min(values) - 0.01, PAPER_FMNIST_MEAN - 0.01), 1.0)
        ax.axvline(PAPER_FMNIST_MEAN, color="gray", ls="--", lw=1, label="paper (~0.945)")
        ax.set_xlabel("mean ROC-AUC")
        ax.legend(fontsize=8)

    b = res["table6_backbones"]
    names = [f"{r['backbone']} {kind}" for r in b for kind in ("raw", "l2")]
    values = [r[kind]["mean"] for r in b for kind in ("raw", "l2")]
    files.append(_plot(os.path.join(out, "6_backbones.png"), lambda ax: bars(ax, names, values),
                       "Backbones (offline weights)"))
    t7 = res["table7_treatments"]
    files.append(_plot(os.path.join(out, "7_treatments.png"),
                       lambda ax: bars(ax, [r["treatment"] for r in t7],
                                       [r["mean"] for r in t7]),
                       "Feature treatments"))
    return files


def render_tables(res: dict[str, Any], classes: Sequence[str]) -> str:
    """The result tables as markdown (also what is printed to stdout)."""
    out = []
    t1 = res["table1_pipeline"]
    scorer1 = res["table1_scorer_check"]
    out.append("### 1. One-class protocol, exact kNN (k={k}), through the pipeline\n".format(
        k=res["protocol"]["k"]))
    t1s = res["table1_pipeline_sqrt_l2"]
    out.append(_table(["normal class", "ROC-AUC (dn2 score table)", "DN2Scorer on the shards",
                       "dn2 score table, --feature-transform sqrt-l2"],
                      [[name, _f(a), _f(b), _f(c)] for name, a, b, c in
                       zip(classes, t1["per_class"], scorer1["per_class"], t1s["per_class"],
                           strict=True)]
                      + [["**mean**", f"**{_f(t1['mean'])}**", _f(scorer1["mean"]),
                          f"**{_f(t1s['mean'])}**"]]))
    out.append("\n### 2. K-means approximation vs exact kNN\n")
    out.append(_table(["method", "mean ROC-AUC", "Δ vs exact", "scoring µs/query",
                       "fit s/class"],
                      [[r["method"], _f(r["mean"]),
                        _f(None if r["mean"] is None else r["mean"] - res["table2_kmeans"][0]
                           ["mean"], 4),
                        _f(r.get("score_us_per_query"), 1), _f(r.get("fit_seconds_per_class"), 3)]
                       for r in res["table2_kmeans"]]))
    out.append("\n### 3. Few-shot (random draws of n normal images per class)\n")
    out.append(_table(["n per class", "mean ROC-AUC", "std over draws", "draws"],
                      [[r["n"], _f(r["mean"]), _f(r.get("std_over_draws")),
                        r.get("draws", r.get("skipped"))] for r in res["table3_few_shot"]]))
    out.append("\n### 4. Impurities in the normal set\n")
    out.append(_table(["impurity", "without cleaning", "with cleaning (fraction = impurity)",
                       "dropped images that were impure"],
                      [[f"{100 * r['impurity']:.0f}%", _f(r["without_cleaning"]["mean"]),
                        _f(r["with_cleaning"]["mean"]), _f(r["dropped_that_were_impure"], 3)]
                       for r in res["table4_impurities"]]))
    out.append("\n### 5. Number of neighbours k\n")
    out.append(_table(["k", "mean ROC-AUC (as embedded)", "L2-normalized", "sqrt + L2"],
                      [[r["k"], _f(r["mean"]), _f(r.get("l2", {}).get("mean")),
                        _f(r.get("sqrt_l2", {}).get("mean"))] for r in res["table5_k"]]))
    out.append("\n### 6. Backbones with offline weights\n")
    out.append(_table(["backbone", "mean ROC-AUC", "L2-normalized", "embedding images/s"]
                      + [c for c in classes],
                      [[r["backbone"], _f(r["raw"]["mean"]), _f(r["l2"]["mean"]),
                        _f(r["images_per_second"], 1)] + [_f(a, 3) for a in r["raw"]["per_class"]]
                       for r in res["table6_backbones"]]))
    if res.get("backbones_skipped"):
        out.append("\nNot measured: " + "; ".join(f"{b}: {why}" for b, why in
                                                  res["backbones_skipped"].items()))
    out.append("\n### 7. Feature treatments\n")
    out.append(_table(["treatment", "mean ROC-AUC"],
                      [[r["treatment"], _f(r["mean"])] for r in res["table7_treatments"]]))
    return "\n".join(out) + "\n"


# -- command line ---------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_TRAIN} training images per class, first {QUICK_TEST} test "
                        "images (the default sizes)")
    p.add_argument("--train-per-class", type=int, default=None,
                   help=f"normal training images per class (full protocol: {FULL_TRAIN})")
    p.add_argument("--test", type=int, default=None,
                   help=f"first M test images scored (full protocol: {FULL_TEST})")
    p.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES),
                   help="comma-separated backbones to embed and compare; the first is the "
                        "headline backbone")
    p.add_argument("--no-hflip", dest="hflip", action="store_false",
                   help="skip the horizontal-flip store (flip test-time averaging)")
    p.add_argument("--hflip-train-per-class", type=int, default=None,
                   help="flip TTA on a smaller subset: first N per class (default: all)")
    p.add_argument("--hflip-test", type=int, default=None,
                   help="flip TTA on a smaller subset: first M test images (default: all)")
    p.add_argument("--skipped-note", action="append", default=[], metavar="BACKBONE=WHY",
                   help="record in the report why a backbone was not measured")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--cache", default=os.path.join("bench-out", "fmnist"))
    p.add_argument("--out", default=None, help="report folder (default CACHE/report-nN-tM)")
    p.add_argument("--embed-only", action="store_true", help="write the store and embed, stop")
    p.add_argument("--baselines", action="store_true",
                   help="also compare kNN with one-class baselines and draw a t-SNE view "
                        "(benchmarks/baselines.py; about 10 min at --quick sizes here)")
    p.add_argument("--embed-args", default="",
                   help="extra dn2 embed arguments, e.g. '--batch-size 32'")
    args = p.parse_args(argv)
    if args.quick and (args.train_per_class or args.test):
        p.error("--quick fixes the sizes; drop --train-per-class/--test or --quick")
    args.train_per_class = args.train_per_class or QUICK_TRAIN
    args.test = args.test or QUICK_TEST
    args.backbones = [b for b in args.backbones.split(",") if b]
    args.out = args.out or os.path.join(args.cache, f"report-n{args.train_per_class}"
                                                    f"-t{args.test}")
    return args


def embed_all(args: argparse.Namespace, ds: Dataset, prot: Protocol,
              flip_prot: Protocol | None) -> dict[str, Any]:
    """Writes the stores and embeds every (backbone, treatment). Returns timing facts."""
    extra = args.embed_args.split()
    facts: dict[str, Any] = {}
    t0 = time.perf_counter()
    manifests = write_store(args.cache, ds, prot)
    flipped = write_store(args.cache, ds, flip_prot, hflip=True) if flip_prot else None
    facts["store_seconds"] = round(time.perf_counter() - t0, 1)
    head = args.backbones[0]
    plan = [(head, head, manifests, prot)]
    if flipped:
        plan.append((head, head + "-hflip", flipped, flip_prot))
    plan += [(b, b, manifests, prot) for b in args.backbones[1:]]
    for backbone, treatment, sets, p in plan:
        t1 = time.perf_counter()
        markers = embed_sets(args.cache, sets, backbone, treatment, p, extra)
        seconds = sum(float(m.get("seconds", 0)) for m in markers.values())
        images = sum(int(m.get("embedded", 0)) for m in markers.values())
        facts[treatment] = {"images": images, "pipeline_runs": len(markers),
                            "embed_seconds": round(seconds, 1),
                            "images_per_second": round(images / seconds, 2) if seconds else None,
                            "this_run_seconds": round(time.perf_counter() - t1, 1)}
        LOG.info("%s: %s images, %.0f s of embedding (%.1f img/s)", treatment, images,
                 seconds, images / max(seconds, 1e-9))
    return facts


def run_tables(args: argparse.Namespace, ds: Dataset, prot: Protocol,
               flip_prot: Protocol | None, embedding: dict[str, Any]) -> dict[str, Any]:
    head = args.backbones[0]
    feats = {b: load_treatment(args.cache, b, prot) for b in args.backbones}
    if flip_prot:
        feats[head + "-hflip"] = load_treatment(args.cache, head + "-hflip", flip_prot)
    base = feats[head]
    res: dict[str, Any] = {}
    timings = {}
    t0 = time.perf_counter()
    res["table1_pipeline"] = table_pipeline(args, prot, head, ds.classes)
    timings["table1_pipeline"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res["table1_pipeline_sqrt_l2"] = table_pipeline(args, prot, head, ds.classes, "sqrt-l2")
    timings["table1_pipeline_sqrt_l2"] = time.perf_counter() - t0
    steps = [
        ("table1_scorer_check", lambda: summary(per_class_auc(base, args.k))),
        ("table2_kmeans", lambda: table_kmeans(base, args.k)),
        ("table3_few_shot", lambda: table_few_shot(base, args.k)),
        ("table4_impurities", lambda: table_impurities(base, args.k)),
        ("table5_k", lambda: table_k(base)),
        ("table6_backbones", lambda: table_backbones(feats, args.backbones, args.k, embedding)),
        ("table7_treatments", lambda: table_treatments(
            feats, args.backbones, args.k,
            (flip_prot.train_per_class, flip_prot.test) if flip_prot else None)),
    ]
    for name, step in steps:
        t0 = time.perf_counter()
        res[name] = step()
        timings[name] = time.perf_counter() - t0
        LOG.info("%s done in %.1f s", name, timings[name])
    if args.baselines:
        t0 = time.perf_counter()
        res["baselines"] = run_baselines(
            base.train, base.test, base.test_labels,
            {c: ds.train_images[prot.train_idx[c]] for c in base.train},
            ds.test_images[prot.test_idx], os.path.join(args.out, "baselines"), k=args.k,
            class_names=ds.classes, features_name=f"dn2 pipeline features ({head})")
        timings["baselines"] = time.perf_counter() - t0
    res["table_seconds"] = {k: round(v, 2) for k, v in timings.items()}
    return res


def best_row(res: dict[str, Any]) -> tuple[str, float]:
    """The best full-protocol mean ROC-AUC of any measured configuration."""
    cands = [("table 1 (pipeline)", res["table1_pipeline"]["mean"]),
             ("table 1 (pipeline, --feature-transform sqrt-l2)",
              res["table1_pipeline_sqrt_l2"]["mean"])]
    for r in res["table5_k"]:
        if r["mean"] is not None:
            cands += [(f"k={r['k']}", r["mean"]), (f"k={r['k']}, L2", r["l2"]["mean"]),
                      (f"k={r['k']}, sqrt + L2", r["sqrt_l2"]["mean"])]
    cands += [(f"{r['backbone']} L2-normalized", r["l2"]["mean"]) for r in res["table6_backbones"]]
    cands += [(r["backbone"], r["raw"]["mean"]) for r in res["table6_backbones"]]
    cands += [(r["treatment"], r["mean"]) for r in res["table7_treatments"]
              if "subset" not in r]
    return max(cands, key=lambda c: c[1])


def write_report(args: argparse.Namespace, res: dict[str, Any], classes: Sequence[str],
                 argv: Sequence[str]) -> str:
    os.makedirs(args.out, exist_ok=True)
    res["plots"] = write_plots(args.out, res, classes)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    tables = render_tables(res, classes)
    prot = res["protocol"]
    emb = res["embedding"]
    best_name, best_mean = best_row(res)
    lines = [
        "# DN2 on Fashion-MNIST through the dn2 pipeline",
        "",
        f"Command: `python benchmarks/fashion_mnist.py {' '.join(argv)}`  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores (shared), no GPU used  ",
        f"Run finished {time.strftime('%Y-%m-%d %H:%M:%S')}, total wall time of this run "
        f"{res['wall_seconds']:.0f} s (embedding reused from the cache where present).",
        "",
        "## Protocol",
        "",
        f"* Normal set: the first **{prot['train_per_class']}** training images of the normal "
        f"class; scored: the first **{prot['test']}** test images (all classes); positive = not "
        f"the normal class; score = mean Euclidean distance to the k={prot['k']} nearest normal "
        "features (higher = more anomalous). "
        + ("This is the documented `--quick` subset (500/class, 2000 tests); the paper's protocol "
           "is 6000/class and 10000 tests (`--train-per-class 6000 --test 10000`)."
           if (prot["train_per_class"], prot["test"]) == (QUICK_TRAIN, QUICK_TEST) else ""),
        f"* Headline backbone `{prot['backbones'][0]}`; every backbone's features were made by "
        "`dn2 embed` on PNG files written from Debian's dataset-fashion-mnist (28x28 grey, "
        "decoded to RGB, resized and centre-cropped by the pipeline).",
        "* Table 1 runs `dn2 build-index` and `dn2 score --features` per class; its ROC-AUC is "
        "computed from the written anomalies table (label from the carried manifest column). "
        "The other tables score the pipeline's feature shards with "
        "`dn2ops.score.estimator.DN2Scorer` (the estimator `dn2 build-index` wraps); the "
        "second column of table 1 checks the two agree.",
        "* Few-shot: n random images of the class, mean over 5 draws (1 draw for all); with "
        "n <= k the score is the mean distance to all n. 'all' = every embedded image "
        f"({prot['train_per_class']} per class).",
        "* Impurities: all images of the class plus round(p n / (1 - p)) random training images "
        "of the other classes (so a fraction p is impure); cleaning = DN2Scorer "
        "clean_fraction=p (drops the fraction p with the highest leave-one-out kNN score; the "
        "rate is assumed known).",
        "* K-means: faiss K-means (20 iterations, seed 1234) on each class's normal features; "
        "score = distance to the nearest centre. Scoring time: best of 3 `score_samples` over "
        "the whole test set, same code for exact and K-means, divided by the queries.",
    ]
    lines.append("* Feature treatments (tables 5-7) are applied to the normal and test features "
                 "alike after loading the shards: L2 = rows scaled to unit norm; sqrt + L2 = "
                 "element-wise square root of the (non-negative) pooled activations, then L2; "
                 "concatenation = each backbone's treated features side by side.")
    if prot.get("hflip"):
        n, m = prot["hflip"]
        lines.append(f"* Flip TTA: a mirrored copy of the store ({n}/class, {m} tests) embedded "
                     "by `dn2 embed`; the feature of an image is the mean of its own and its "
                     "mirror's feature (normal and test images alike).")
    lines += ["", "## Embedding (dn2 embed)", "",
              _table(["features", "images", "dn2 embed runs", "embedding s", "images/s"],
                     [[name, e["images"], e["pipeline_runs"], e["embed_seconds"],
                       e["images_per_second"]] for name, e in emb.items()
                      if isinstance(e, dict)]),
              "", "Seconds are those recorded in each features directory's `_SUCCESS` at the "
              "time it was embedded (the CPU was shared with other jobs).", ""]
    if res.get("backbones_skipped"):
        lines += ["Backbones not measured: " + "; ".join(
            f"`{b}`: {why}" for b, why in res["backbones_skipped"].items()), ""]
    lines += ["## Results", "", tables, "",
              "## Against the paper", "",
              f"* Paper (DN2, ResNet-101, ImageNet weights, full protocol): mean ROC-AUC "
              f"{PAPER['fmnist_mean_resnet101']}.",
              f"* dn2 through the pipeline ({prot['backbones'][0]}, k={prot['k']}): "
              f"**{res['table1_pipeline']['mean']:.4f}**.",
              f"* Best configuration measured here: {best_name}: **{best_mean:.4f}**.",
              "* Paper, CIFAR-10, K-means vs exact: exact 92.52; C = 1, 3, 5, 10: 91.94, 92.00, "
              "91.87, 91.64 (within a point). Here: "
              + ", ".join(f"{r['method']} {_f(r['mean'])}" for r in res["table2_kmeans"]) + ".",
              "", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in res["plots"]]
    if "baselines" in res:  # its pictures live in the baselines/ subfolder
        lines += ["", render_markdown(res["baselines"], "baselines/")]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    return tables


def main(argv: Sequence[str] | None = None,
         dataset: Callable[[], Dataset] = fashion_mnist) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # force: importing apache_beam already installed a WARNING-level root handler.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    started = time.perf_counter()
    ds = dataset()
    prot = select(ds, args.train_per_class, args.test)
    flip_prot = None
    if args.hflip:
        flip_prot = select(ds, min(args.hflip_train_per_class or prot.train_per_class,
                                   prot.train_per_class),
                           min(args.hflip_test or prot.test, prot.test))
    embedding = embed_all(args, ds, prot, flip_prot)
    if args.embed_only:
        return {"embedding": embedding}
    res = {"protocol": {"train_per_class": prot.train_per_class, "test": prot.test,
                        "k": args.k, "backbones": args.backbones, "classes": list(ds.classes),
                        "hflip": [flip_prot.train_per_class, flip_prot.test] if flip_prot
                        else None, "cache": args.cache},
           "paper": PAPER, "embedding": embedding,
           "backbones_skipped": dict(s.split("=", 1) for s in args.skipped_note)}
    res.update(run_tables(args, ds, prot, flip_prot, embedding))
    res["wall_seconds"] = round(time.perf_counter() - started, 1)
    tables = write_report(args, res, ds.classes, argv)
    print(tables)
    print(f"report: {os.path.join(args.out, 'report.md')}  wall {res['wall_seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
