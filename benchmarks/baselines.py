"""kNN (DN2) against one-class baselines on the same features, and a t-SNE picture.

The paper's analysis argues that kNN on pretrained features beats one-class
methods that fit a single hypersphere, because pretrained features put each
class in a compact, high-density region. This benchmark measures it: each
Fashion-MNIST class in turn is the normal set, and on the same features

* ``knn``: dn2's scorer (DN2Scorer, k=2): mean Euclidean distance to the k
  nearest normal features;
* ``mean-dist``: Euclidean distance to the mean of the normal features (the
  hypersphere centre SVDD-style methods learn);
* ``ocsvm``: scikit-learn ``OneClassSVM`` (RBF) over a grid of ``nu`` and
  ``gamma = mult / (d * var)`` (mult 1 is scikit-learn's ``gamma='scale'``),
  once on the features as they are and once standardised (``StandardScaler``
  fitted on the normal set, as scikit-learn recommends for SVMs). Reported as
  the best grid point per class (chosen on the TEST labels, so optimistic), the
  single grid point with the best mean (also chosen on test) and the grid mean;
* ``mahalanobis``: distance under a Gaussian fitted with Ledoit-Wolf shrinkage
  covariance (``LedoitWolf().fit(Xn).mahalanobis(Xq)``, square-rooted);
* ``knn-pixels``: DN2Scorer (k=2) on raw pixels (784-d, float32 / 255): no
  pretrained features.

Every score is HIGHER = MORE ANOMALOUS (OneClassSVM's decision function is
negated). ROC-AUC per class (anomalous = any other class) and the mean; fit
seconds and scoring microseconds per query, each the mean over the 10 classes
(``time.perf_counter`` around ``fit`` and around ``score_samples``; for the
SVM grids, the mean over all grid points too). A t-SNE view of the test
features, coloured normal/anomalous for one class, goes next to the table.

Call :func:`run_baselines` from another benchmark, or run it alone:

    python benchmarks/baselines.py [--features-root bench-out/fmnist/features/efficientnet_lite0]
        [--train-per-class 500 --test 2000] [--out bench-out/fmnist/baselines]
    python benchmarks/baselines.py --npz bench-out/library/features-model.npz \
        [--out bench-out/baselines]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.manifold import TSNE
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from benchmarks.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from dn2ops.score.estimator import DN2Scorer

NU_GRID: tuple[float, ...] = (0.01, 0.1, 0.5)
GAMMA_MULTS: tuple[float, ...] = (0.1, 1.0, 10.0)  # x 1/(d * var); 1.0 == gamma='scale'


# -- the baselines: fit(X (n, d)) -> self, score_samples(Xq (nq, d)) -> (nq,), higher = anomalous


class MeanDistance:
    """Euclidean distance to the mean of the normal features (an SVDD-style centre)."""

    def fit(self, X: np.ndarray) -> MeanDistance:
        self.center_ = np.asarray(X, np.float64).mean(axis=0)
        return self

    def score_samples(self, Xq: np.ndarray) -> np.ndarray:
        """(nq,) float64 distances to the centre: higher = more anomalous."""
        return np.linalg.norm(np.asarray(Xq, np.float64) - self.center_, axis=1)


class Mahalanobis:
    """Mahalanobis distance under a Gaussian with Ledoit-Wolf shrinkage covariance."""

    def fit(self, X: np.ndarray) -> Mahalanobis:
        # float64: the shrunk covariance of 1280-d features is inverted.
        self.lw_ = LedoitWolf().fit(np.asarray(X, np.float64))
        self.precision_ = self.lw_.get_precision()
        return self

    def score_samples(self, Xq: np.ndarray) -> np.ndarray:
        """(nq,) float64 Mahalanobis distances: sqrt of ``self.lw_.mahalanobis(Xq)``.

        Computed as one matrix product: sklearn's ``mahalanobis`` goes through
        scipy's per-row cdist, ~30x slower, which would time the implementation
        rather than the method.
        """
        diff = np.asarray(Xq, np.float64) - self.lw_.location_
        d2 = np.einsum("ij,ij->i", diff @ self.precision_, diff)
        return np.sqrt(np.maximum(d2, 0.0))


class OCSVM:
    """OneClassSVM (RBF) with gamma = gamma_mult / (d * var of the fitted X), negated score.

    ``standardize`` first fits a StandardScaler on the normal set. gamma_mult=1
    reproduces scikit-learn's ``gamma='scale'`` on the (scaled) data.
    """

    def __init__(self, nu: float, gamma_mult: float, standardize: bool) -> None:
        self.nu, self.gamma_mult, self.standardize = nu, gamma_mult, standardize

    def fit(self, X: np.ndarray) -> OCSVM:
        X = np.asarray(X, np.float64)
        self.scaler_ = StandardScaler().fit(X) if self.standardize else None
        if self.scaler_ is not None:
            X = self.scaler_.transform(X)
        self.gamma_ = self.gamma_mult / (X.shape[1] * X.var())
        self.svm_ = OneClassSVM(kernel="rbf", nu=self.nu, gamma=self.gamma_).fit(X)
        return self

    def score_samples(self, Xq: np.ndarray) -> np.ndarray:
        """(nq,) float64: minus the SVM decision function, higher = more anomalous."""
        Xq = np.asarray(Xq, np.float64)
        if self.scaler_ is not None:
            Xq = self.scaler_.transform(Xq)
        return -self.svm_.decision_function(Xq)


def knn_scorer(k: int = 2) -> DN2Scorer:
    return DN2Scorer(k=k)


# -- measurement


def timed(make: Callable[[], Any], X: np.ndarray, Xq: np.ndarray
          ) -> tuple[np.ndarray, float, float]:
    """(scores (nq,), fit seconds, scoring microseconds per query) of a fresh estimator."""
    est = make()
    t0 = time.perf_counter()
    est.fit(X)
    t1 = time.perf_counter()
    scores = np.asarray(est.score_samples(Xq), np.float64)
    t2 = time.perf_counter()
    return scores, t1 - t0, (t2 - t1) / len(Xq) * 1e6


def _auc(normal_class: int, y: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(y != normal_class, scores))


def _evaluate(make: Callable[[], Any], train_by_class: dict[int, np.ndarray],
              X_test: np.ndarray, y_test: np.ndarray) -> dict[str, Any]:
    """One method over every class: per-class AUC, their mean, mean fit s and us/query."""
    aucs, fits, scores_us, scores = {}, [], [], {}
    for c in sorted(train_by_class):
        scores[c], fit_s, us = timed(make, train_by_class[c], X_test)
        aucs[c] = _auc(c, y_test, scores[c])
        fits.append(fit_s)
        scores_us.append(us)
    return {"roc_auc": aucs, "mean_roc_auc": float(np.mean(list(aucs.values()))),
            "fit_seconds": float(np.mean(fits)), "score_us_per_query": float(np.mean(scores_us)),
            "scores": scores}


def bootstrap_mean_auc_diff(scores_a: dict[int, np.ndarray], scores_b: dict[int, np.ndarray],
                            y: np.ndarray, *, n_boot: int = 500, seed: int = 0
                            ) -> tuple[float, float]:
    """95% paired-bootstrap interval of mean-over-classes AUC(a) - AUC(b).

    scores_*: class -> (nq,) scores of the same test rows; the test rows are
    resampled with replacement, the same resample for both methods and every
    class, so the interval reflects the test set's sampling noise.
    """
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for b in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        diffs[b] = np.mean([_auc(c, y[i], scores_a[c][i]) - _auc(c, y[i], scores_b[c][i])
                            for c in scores_a])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(lo), float(hi)


def _ocsvm_grid(train_by_class: dict[int, np.ndarray], X_test: np.ndarray, y_test: np.ndarray,
                standardize: bool, nus: Sequence[float], gamma_mults: Sequence[float]
                ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Three summary rows (best per class, best single config, grid mean) and the full grid."""
    grid = []
    for nu in nus:
        for gm in gamma_mults:
            res = _evaluate(lambda nu=nu, gm=gm: OCSVM(nu, gm, standardize),
                            train_by_class, X_test, y_test)
            res.pop("scores")  # 9 configs x 10 classes of scores: not kept
            grid.append({"nu": nu, "gamma_mult": gm, **res})
    classes = sorted(train_by_class)
    fit_s = float(np.mean([g["fit_seconds"] for g in grid]))
    us = float(np.mean([g["score_us_per_query"] for g in grid]))
    tag = "std" if standardize else "raw"
    best_per_class = {c: max(g["roc_auc"][c] for g in grid) for c in classes}
    best_cfg = max(grid, key=lambda g: g["mean_roc_auc"])
    grid_mean = {c: float(np.mean([g["roc_auc"][c] for g in grid])) for c in classes}
    rows = {
        f"ocsvm-{tag} best/class*": {
            "roc_auc": best_per_class,
            "chosen": {c: max(grid, key=lambda g, c=c: g["roc_auc"][c]) for c in classes}},
        f"ocsvm-{tag} best config*": {"roc_auc": dict(best_cfg["roc_auc"]),
                                      "config": {"nu": best_cfg["nu"],
                                                 "gamma_mult": best_cfg["gamma_mult"]}},
        f"ocsvm-{tag} grid mean": {"roc_auc": grid_mean},
    }
    for r in rows.values():
        r["mean_roc_auc"] = float(np.mean(list(r["roc_auc"].values())))
        r["fit_seconds"], r["score_us_per_query"] = fit_s, us
        if "chosen" in r:
            r["chosen"] = {c: {"nu": g["nu"], "gamma_mult": g["gamma_mult"]}
                           for c, g in r["chosen"].items()}
    return rows, grid


# -- t-SNE picture


def tsne_embedding(X: np.ndarray, *, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """(n, 2) t-SNE of X (n, d) (scikit-learn, PCA init, seeded)."""
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed
                ).fit_transform(np.asarray(X, np.float32))


def plot_tsne(Y: np.ndarray, is_normal: np.ndarray, title: str, path: str) -> str:
    """Scatter Y (n, 2): normal points blue, anomalous orange, legend; PNG to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6.5), dpi=120)
    ax.scatter(*Y[~is_normal].T, s=6, c="tab:orange", alpha=0.5,
               label=f"anomalous (other classes, n={int((~is_normal).sum())})")
    ax.scatter(*Y[is_normal].T, s=9, c="tab:blue", alpha=0.9,
               label=f"normal (n={int(is_normal.sum())})")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", markerscale=2.5, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_tsne_classes(Y: np.ndarray, y: np.ndarray, names: Sequence[str], title: str,
                      path: str) -> str:
    """Scatter Y (n, 2) coloured by class label y (n,), legend with names; PNG to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6.5), dpi=120)
    cmap = plt.get_cmap("tab10")
    for c in np.unique(y):
        ax.scatter(*Y[y == c].T, s=6, color=cmap(int(c) % 10), alpha=0.7,
                   label=names[int(c)] if int(c) < len(names) else str(c))
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", markerscale=2.5, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- report


def render_markdown(result: dict[str, Any], link_dir: str = "") -> str:
    """The markdown section of a :func:`run_baselines` result.

    ``link_dir`` prefixes the picture links, for a report that lives elsewhere
    (e.g. ``"baselines/"`` when the report sits in out_dir's parent).
    """
    files = result["files"]
    pictures = [link_dir + os.path.basename(files[k]) for k in ("tsne", "tsne_classes")
                if k in files]
    return _markdown(result["rows"], sorted(next(iter(result["rows"].values()))["roc_auc"]),
                     result["class_names"], result["protocol"], pictures)


def _markdown(rows: dict[str, dict[str, Any]], classes: list[int], names: Sequence[str],
              protocol: dict[str, Any], tsne_files: list[str]) -> str:
    methods = list(rows)
    short = {m: m.replace(" ", "&nbsp;") for m in methods}
    lines = ["## kNN against one-class baselines", "",
             f"Same features for every method ({protocol['features']}); each class in turn "
             f"is normal ({protocol['train_sizes']} training images per class), scored: "
             f"{protocol['n_test']} test images, anomalous = any other class. ROC-AUC, "
             "higher is better. Scores: higher = more anomalous.", "",
             "| class | " + " | ".join(short[m] for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for c in classes:
        name = names[c] if c < len(names) else str(c)
        lines.append(f"| {c} {name} | "
                     + " | ".join(f"{rows[m]['roc_auc'][c]:.4f}" for m in methods) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{rows[m]['mean_roc_auc']:.4f}**"
                                             for m in methods) + " |")
    lines.append("| kNN − this, 95% CI | " + " | ".join(
        "[{:+.4f}, {:+.4f}]".format(*rows[m]["knn_minus_this_ci95"])
        if "knn_minus_this_ci95" in rows[m] else "" for m in methods) + " |")
    lines.append("| fit s (mean/class) | "
                 + " | ".join(f"{rows[m]['fit_seconds']:.3f}" for m in methods) + " |")
    lines.append("| score µs/query | "
                 + " | ".join(f"{rows[m]['score_us_per_query']:.1f}" for m in methods) + " |")
    nus = ", ".join(str(v) for v in protocol["ocsvm_nu"])
    gms = ", ".join(str(v) for v in protocol["ocsvm_gamma_mult"])
    lines += [
        "",
        "* `knn`: DN2Scorer, k=2 (dn2's scorer). `mean-dist`: Euclidean distance to the mean "
        "of the normal features. `mahalanobis`: Ledoit-Wolf shrinkage covariance. "
        "`knn-pixels`: DN2Scorer k=2 on raw 784-d pixels / 255 (no pretrained features).",
        f"* `ocsvm-raw` / `ocsvm-std`: OneClassSVM (RBF) on the features as they are / "
        f"standardised by a StandardScaler fitted on the normal set; grid nu ∈ {{{nus}}} × "
        f"gamma = m / (d · var), m ∈ {{{gms}}} (m=1 is sklearn's gamma='scale').",
        "* \\* *best/class* picks, per class, the grid point with the best **test** ROC-AUC; "
        "*best config* the single grid point with the best mean test ROC-AUC. Both choose on "
        "the test labels and are therefore optimistic upper bounds; *grid mean* is what a user "
        "without labelled anomalies can expect from an arbitrary grid point. Fit/score times "
        "of the OCSVM rows are the mean over all grid points.",
        f"* *kNN − this*: 95% interval of the difference in mean ROC-AUC, paired bootstrap "
        f"over the test images ({protocol['n_boot']} resamples); an interval above 0 means "
        "kNN is better beyond the test set's sampling noise. Not given for the OCSVM rows "
        "(several configurations).",
        "* Times: `time.perf_counter` around `fit` (per class, mean over classes) and "
        "`score_samples` (all test queries, divided by their number), one process on "
        f"{protocol['cpu']}, shared machine: read ratios, not absolutes. kNN's fit includes "
        "the leave-one-out scores dn2 keeps for percentiles.",
    ]
    if tsne_files:
        lines += ["", "### t-SNE of the test features", ""]
        lines += [f"![{os.path.basename(p)}]({p})" for p in tsne_files]
        lines += ["", f"scikit-learn TSNE, perplexity {protocol['tsne_perplexity']}, PCA init, "
                  f"seed {protocol['seed']}, on the {protocol['n_test']} test features "
                  f"({protocol['features']})."]
    return "\n".join(lines) + "\n"


def run_baselines(train_by_class: dict[int, np.ndarray], test_X: np.ndarray,
                  test_y: np.ndarray, raw_train_by_class: dict[int, np.ndarray] | None,
                  raw_test: np.ndarray | None, out_dir: str, *, k: int = 2,
                  tsne_class: int | None = 0, perplexity: float = 30.0, seed: int = 0,
                  nus: Sequence[float] = NU_GRID, gamma_mults: Sequence[float] = GAMMA_MULTS,
                  class_names: Sequence[str] = FASHION_MNIST_CLASSES,
                  features_name: str = "features", n_boot: int = 500) -> dict[str, Any]:
    """Compare kNN with the baselines; write baselines.md/.json and tsne PNGs to out_dir.

    Args:
        train_by_class: class id -> normal training features (n_c, d).
        test_X, test_y: test features (nq, d) and their class ids (nq,).
        raw_train_by_class, raw_test: the same images as raw pixels, flattened
            or not ((n_c, 28, 28) uint8 is fine; scaled to [0, 1]), test rows
            aligned with ``test_y``; None skips the raw-pixel baseline.
        out_dir: created if missing.
        tsne_class: normal class of the t-SNE picture (None: no picture).

    Returns (JSON-safe; :func:`render_markdown` re-renders the section with other links):
        ``{"rows": {method: {"roc_auc": {class: auc}, "mean_roc_auc", "fit_seconds",
        "score_us_per_query", ...}}, "ocsvm_grid": {...}, "markdown": str,
        "files": {...}, "protocol": {...}}``; every score is higher = more anomalous.
    """
    os.makedirs(out_dir, exist_ok=True)
    test_y = np.asarray(test_y)
    load_before = os.getloadavg()[0]
    rows: dict[str, dict[str, Any]] = {}
    rows["knn"] = _evaluate(lambda: knn_scorer(k), train_by_class, test_X, test_y)
    rows["mean-dist"] = _evaluate(MeanDistance, train_by_class, test_X, test_y)
    grids = {}
    for standardize in (False, True):
        r, grid = _ocsvm_grid(train_by_class, test_X, test_y, standardize, nus, gamma_mults)
        rows.update(r)
        grids["std" if standardize else "raw"] = grid
    rows["mahalanobis"] = _evaluate(Mahalanobis, train_by_class, test_X, test_y)
    if raw_train_by_class is not None and raw_test is not None:
        if len(raw_test) != len(test_y):
            raise ValueError(f"raw_test has {len(raw_test)} rows, test_y {len(test_y)}")
        pix = {c: np.asarray(v, np.float32).reshape(len(v), -1) / 255.0
               for c, v in raw_train_by_class.items()}
        pix_test = np.asarray(raw_test, np.float32).reshape(len(raw_test), -1) / 255.0
        rows["knn-pixels"] = _evaluate(lambda: knn_scorer(k), pix, pix_test, test_y)

    # Paired bootstrap of the test set: kNN minus each single-configuration method.
    for m, r in rows.items():
        if m != "knn" and "scores" in r:
            r["knn_minus_this_ci95"] = bootstrap_mean_auc_diff(
                rows["knn"]["scores"], r["scores"], test_y, n_boot=n_boot, seed=seed)
    for r in rows.values():
        r.pop("scores", None)

    files = {}
    if tsne_class is not None:
        t0 = time.perf_counter()
        Y = tsne_embedding(test_X, perplexity=perplexity, seed=seed)
        t_tsne = time.perf_counter() - t0
        name = class_names[tsne_class] if tsne_class < len(class_names) else str(tsne_class)
        files["tsne"] = plot_tsne(
            Y, test_y == tsne_class,
            f"t-SNE of {len(test_y)} test images' features: normal = class {tsne_class} "
            f"'{name}'\n{features_name}\nROC-AUC of this class: kNN "
            f"{rows['knn']['roc_auc'][tsne_class]:.3f}, mean-dist "
            f"{rows['mean-dist']['roc_auc'][tsne_class]:.3f}, Mahalanobis "
            f"{rows['mahalanobis']['roc_auc'][tsne_class]:.3f}",
            os.path.join(out_dir, f"tsne-class{tsne_class}.png"))
        files["tsne_classes"] = plot_tsne_classes(
            Y, test_y, class_names, f"Same t-SNE, coloured by class\n{features_name}",
            os.path.join(out_dir, "tsne-classes.png"))
        files["tsne_seconds"] = t_tsne

    protocol = {"features": features_name, "dim": int(test_X.shape[1]), "k": k,
                "train_sizes": sorted({len(v) for v in train_by_class.values()}),
                "n_test": int(len(test_y)), "ocsvm_nu": list(nus),
                "ocsvm_gamma_mult": list(gamma_mults), "tsne_class": tsne_class,
                "tsne_perplexity": perplexity, "seed": seed,
                "cpu": f"{os.cpu_count()} CPU core(s), 1-min load average "
                       f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after",
                "n_boot": n_boot}
    result = {"protocol": protocol, "class_names": list(class_names), "rows": rows,
              "ocsvm_grid": grids, "files": files}
    result["markdown"] = md = render_markdown(result)
    files["markdown"] = os.path.join(out_dir, "baselines.md")
    with open(files["markdown"], "w") as f:
        f.write(md)
    files["json"] = os.path.join(out_dir, "baselines.json")
    with open(files["json"], "w") as f:
        json.dump(result, f, indent=2, default=_json_default)
    return result


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))


# -- CLI: load the pipeline's feature shards (or the library npz) plus raw pixels


def _first_per_class(labels: np.ndarray, per_class: int) -> dict[int, np.ndarray]:
    return {c: np.flatnonzero(labels == c)[:per_class] for c in range(10)}


def load_npz(path: str) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """benchmarks/library_auc.py's npz (first N train images per class, first M test)."""
    z = np.load(path)
    ftr, ytr, fte, yte = z["ftr"], z["ytr"], z["fte"], z["yte"]
    return {c: ftr[ytr == c] for c in range(10)}, fte, yte


def load_pipeline(root: str, train_per_class: int, n_test: int
                  ) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray,
                             dict[int, np.ndarray], np.ndarray]:
    """The accuracy benchmark's feature shards: root/{train-c{c}-n{N}, test-n{M}}/.

    benchmarks/fashion_mnist.py's manifests carry ``id`` (``train/{c}/{i:05d}``
    or ``test/{i:05d}``, i = position in the Fashion-MNIST split) and ``label``.
    Rows are sorted by id so the raw pixels ``split[i]`` line up, and every label
    is checked against the dataset's.
    Returns (train features by class, test X, test y, raw train by class, raw test).
    """
    from dn2ops.io.features import load_features

    def ordered(d: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table, X, _ = load_features(d)
        ids = table.column("id").to_pylist()
        idx = np.asarray([int(v.rsplit("/", 1)[1]) for v in ids])
        lab = np.asarray([int(v) for v in table.column("label").to_pylist()])
        order = np.argsort(idx, kind="stable")
        return X[order], idx[order], lab[order]

    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    train, raw_train = {}, {}
    for c in range(10):
        X, idx, lab = ordered(os.path.join(root, f"train-c{c}-n{train_per_class}"))
        if not (np.all(lab == c) and np.all(ytr[idx] == c)):
            raise ValueError(f"train-c{c}: labels other than {c}")
        train[c], raw_train[c] = X, xtr[idx]
    X, idx, lab = ordered(os.path.join(root, f"test-n{n_test}"))
    if not np.array_equal(yte[idx], lab):
        raise ValueError("test manifest labels disagree with the dataset's")
    return train, X, lab, raw_train, xte[idx]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features-root", default="bench-out/fmnist/features/efficientnet_lite0",
                   help="dir with train-c{c}-n{N}/ and test-n{M}/ committed feature dirs")
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--npz", help="use benchmarks/library_auc.py's features npz instead")
    p.add_argument("--out", default=None, help="default: bench-out/fmnist/baselines "
                   "(bench-out/baselines with --npz)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--tsne-class", type=int, default=0)
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=500)
    args = p.parse_args(argv)

    if args.npz:
        train, X_test, y_test = load_npz(args.npz)
        per_class = min(len(v) for v in train.values())
        xtr, ytr = load_fashion_mnist(split="train")
        xte, yte = load_fashion_mnist(split="test")
        sel = _first_per_class(ytr, per_class)
        raw_train = {c: xtr[i] for c, i in sel.items()}
        if not np.array_equal(yte[: len(y_test)], y_test):
            raise ValueError("npz test labels are not the first test images' labels")
        raw_test = xte[: len(y_test)]
        name = f"EfficientNet-Lite0 features from {args.npz}"
        out = args.out or "bench-out/baselines"
    else:
        train, X_test, y_test, raw_train, raw_test = load_pipeline(
            args.features_root, args.train_per_class, args.test)
        name = f"dn2 pipeline features, {args.features_root}"
        out = args.out or "bench-out/fmnist/baselines"

    t0 = time.perf_counter()
    res = run_baselines(train, X_test, y_test, raw_train, raw_test, out, k=args.k,
                        tsne_class=args.tsne_class, perplexity=args.perplexity,
                        seed=args.seed, features_name=name, n_boot=args.n_boot)
    print(res["markdown"])
    print(f"wrote {res['files']['markdown']}, {res['files']['json']}, "
          f"{res['files'].get('tsne')} in {time.perf_counter() - t0:.0f}s")
    return res


if __name__ == "__main__":
    main()
