"""Calibrated p-values, flags and drift checks for DN2 scores (issue 28), measured.

Every scored row gets a conformal p-value of its score against the normal reference (the
leave-one-out scores of a uniform sample of the normal images):

    p = (1 + #{reference >= score}) / (n + 1)                         source = rank

and, where fewer than ``switch`` reference scores reach the score (below the rank's
resolution), the upper tail of the reference fitted by a generalised Pareto distribution
over its ``n_exceed`` largest scores (peaks over threshold u):

    p = (1 + n_exceed) / (n + 1) * GPD.sf(score - u)                  source = tail

capped at (1 + switch) / (n + 1) so p falls with the score. Defaults (``fit_tail``):
n_exceed = 5% of n, 50 to 500 (at most n / 2; no tail under 20), switch = 10, and the
shape held >= 0 (a fitted negative shape, a bounded tail, gives p = 0 beyond its end point
and flags normals). Flags: Benjamini-Hochberg at ``--fdr Q`` across a partition, or
p <= ``--alpha A``. Drift: Kolmogorov-Smirnov test of the partition's p-values above 0.2
against the uniform on (0.2, 1], its p-value read with the two-sample effective size
(the reference's own noise), warning below 0.001 (``drift_test``).

Protocol (as benchmarks/accuracy.py, dn2's defaults): normal = the first N training
images of class c, features dn2's default backbone with the root4-l2 transform, k = 2,
exact search; the reference is every normal image's leave-one-out score (dn2's reference
sample of 20,000 exceeds N) or a uniform sample of them (``--sample``). Tables:

  auc          ROC-AUC per class (the accuracy benchmark's figure, as a check)
  calibration  share of the class's test normals with p <= alpha (reference: all normals,
               and a sample), rank and rank + tail
  exchange     within the training split (random held-out normals): LOO reference against
               full conformal (the reference rescored with the new image added): the n-1
               against n bias
  tail         the tail's calibration beyond the rank resolution: small reference samples,
               held-out normals' leave-one-out scores (exchangeable with the sample)
  cleaning     clean sets (drop the top x% LOO over k=200) and contaminated ones (cleaned at
               the true rate): reference of the kept images, of all images against the
               kept set, and of a calibration split kept out of cleaning
  kmeans       K-means (distance to the nearest of C centres): in-sample reference, a
               held-out split, cross-fitting
  bh           test partitions mixing the class's test normals with other classes' test
               images (1%, 10%, 50%): BH's false-discovery proportion and power, alpha flags
  night        40,000 normal-like images with 12 planted anomalies, BH flags
  drift        KS uniformity test of p | p > 0.2: false alarms on clean and anomalous
               partitions, detection of shifted ones (noise on the features, other class)
  default      what a user gets without a flag: auto cleaning (dn2ops.index.cleaning.auto),
               the reference of all rows against the kept set; calibration and BH on clean
               sets and on sets with 5 % / 10 % impurities
  null         what a test set of this size can tell: the default's figures on clean sets
               beside the same figures for p-values that are exactly valid (the class's
               test normals replaced by exchangeable draws, ``--null-sims`` times): how
               often such p-values meet each goal, and where the observed value falls

    python benchmarks/calibration.py --dataset digits --cache /work/bc/acc/features
    python benchmarks/calibration.py --dataset fmnist --tables calibration,bh

Features: ``CACHE/{dataset}/{backbone}/{train,test}.npy`` (benchmarks/accuracy.py's embed
step). Neighbour lists are cached under ``--work``.
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
from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

LOG = logging.getLogger("dn2.bench.calibration")
BACKBONE = "efficientnet_lite0+efficientnet_lite1"  # dn2's default (dn2ops.config)
TRANSFORM = "root4-l2"  # dn2's default (dn2ops.transforms.DEFAULT)
REFERENCE_SAMPLE = 20_000  # dn2ops.config.REFERENCE_SAMPLE
CLEAN_K = 200  # dn2ops.config.CLEAN_K
DEEP_LOO = 201  # leave-one-out neighbours kept per normal image (cleaning over k=200)
DEEP_TEST = 64  # neighbours kept per test image (scores against subsets read from these)
TABLES = ("auc", "calibration", "exchange", "tail", "cleaning", "kmeans", "bh", "night",
          "drift", "default", "null")

# -- p-values, flags and drift: small pure functions (to move into dn2ops) -------------

# The p-values and their tail (dn2ops.index.calibration), flags and drift
# (dn2ops.score.decisions): dn2's own, imported once REPO is on sys.path.
from dn2ops.index.calibration import (  # noqa: E402
    MIN_EXCEED,
    Tail,
    default_exceedances,
    fit_tail,
    p_values,
    rank_floor,
)
from dn2ops.score import decisions  # noqa: E402
from dn2ops.score.decisions import DRIFT_LOWER, bh_flags  # noqa: E402


def drift_test(p: np.ndarray, level: float = 0.001, lower: float = DRIFT_LOWER,
               n_reference: int | None = None) -> tuple[float, float, bool]:
    """(KS statistic, its p-value, warn): dn2ops.score.decisions.drift_test as a tuple,
    NaN and no warning with too few rows above ``lower``."""
    d = decisions.drift_test(p, level=level, lower=lower, n_reference=n_reference)
    nan = float("nan")
    return (nan if d["statistic"] is None else d["statistic"],
            nan if d["pvalue"] is None else d["pvalue"], d["warn"])


# The smallest level at which the tail's calibration was measured (Fashion-MNIST,
# references of 100-3000 scores; benchmarks/calibration.py's tail table).
TAIL_MEASURED_TO = 3e-5


def resolution_message(n: int, level: float, tail: Tail | None) -> str | None:
    """The clear message when a reference of n scores cannot resolve ``level`` (alpha, or
    BH's first cut-off Q / m for m rows); None when it can.

    Rank p-values never go below 1/(n + 1): without a tail no row reaches a lower level
    (BH over m rows at Q flags nothing unless m / (Q (n + 1)) rows lie beyond every
    reference score). With a tail, levels below TAIL_MEASURED_TO are extrapolated
    further than measured."""
    floor = rank_floor(n)
    if level >= floor:
        return None
    if tail is None:
        return (f"the normal reference holds {n} scores: rank p-values go no lower than "
                f"1/(n+1) = {floor:.2g}, above the level {level:.2g} asked; a fitted tail "
                f"needs >= {2 * MIN_EXCEED} reference scores, rank p-values "
                f">= {int(np.ceil(1 / level)) - 1}")
    if level < TAIL_MEASURED_TO:
        return (f"p-values below {TAIL_MEASURED_TO:g} (level {level:.2g} asked) come from "
                f"the tail fitted to the top {tail.n_exceed} of {n} reference scores, "
                "extrapolated beyond the range its calibration was measured in")
    return None


# -- search ---------------------------------------------------------------------------


def search(q: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of base for each row of q: Euclidean distances (m, k) float32
    and ids, searched around base's mean (as dn2ops.index.knn, for float32 accuracy)."""
    import faiss

    mu = base.mean(axis=0, dtype=np.float64).astype(np.float32)
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(np.ascontiguousarray(base - mu))
    D, I = index.search(np.ascontiguousarray(q - mu), int(min(k, len(base))))
    return np.sqrt(np.maximum(D, 0)), I


def search_loo(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest OTHER rows (dn2ops.index.knn.knn_leave_one_out's rule)."""
    n = len(x)
    D, I = search(x, x, min(k, n - 1) + 1)
    drop = I == np.arange(n)[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    k1 = D.shape[1] - 1
    return D[keep].reshape(n, k1), I[keep].reshape(n, k1)


def member_scores(D: np.ndarray, I: np.ndarray, member: np.ndarray, k: int,
                  redo: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Mean distance (m,) to the first k neighbours in the lists (D, I) that are members
    (bool mask over ids); rows with fewer than k members listed are ``redo(rows)``."""
    ok = member[I]
    take = ok & (np.cumsum(ok, axis=1) <= k)
    out = (D * take).sum(axis=1, dtype=np.float64) / k
    short = np.flatnonzero(take.sum(axis=1) < k)
    if len(short):
        out[short] = redo(short)
    return out


# -- data -----------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    name: str
    train: np.ndarray  # transformed features of the whole training split
    test: np.ndarray  # transformed features of the test split
    train_labels: np.ndarray
    test_labels: np.ndarray
    train_idx: dict[int, np.ndarray]  # class -> its normal images (first N of the class)


def labels(dataset: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    if dataset == "fmnist":
        from benchmarks.datasets import load_fashion_mnist

        return (load_fashion_mnist(split="train")[1].astype(int),
                load_fashion_mnist(split="test")[1].astype(int), 6000)
    from sklearn.datasets import load_digits

    y = load_digits().target.astype(int)
    cut = int(0.6 * len(y))
    return y[:cut], y[cut:], None


def load(cache: str, dataset: str, train_per_class: int | None = None) -> Data:
    from dn2ops import transforms

    ytr, yte, full = labels(dataset)
    per_class = train_per_class or full
    base = os.path.join(cache, dataset, BACKBONE)
    feats = {}
    for split in ("train", "test"):
        path = os.path.join(base, f"{split}.npy")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: embed with benchmarks/accuracy.py")
        raw = np.load(path, mmap_mode="r")
        feats[split] = np.concatenate([transforms.apply(raw[a:a + 8192], TRANSFORM)
                                       for a in range(0, len(raw), 8192)])
    idx = {c: np.flatnonzero(ytr == c)[:per_class] for c in np.unique(ytr)}
    return Data(dataset, feats["train"], feats["test"], ytr, yte, idx)


def raw_test(cache: str, dataset: str) -> np.ndarray:
    return np.load(os.path.join(cache, dataset, BACKBONE, "test.npy"), mmap_mode="r")


def raw_train(cache: str, dataset: str) -> np.ndarray:
    return np.load(os.path.join(cache, dataset, BACKBONE, "train.npy"), mmap_mode="r")


@dataclasses.dataclass
class ClassLists:
    """One normal set (rows ``x``) with its neighbour lists: leave-one-out (n, DEEP_LOO)
    and test images against it (m, DEEP_TEST)."""

    x: np.ndarray
    loo_D: np.ndarray
    loo_I: np.ndarray
    test_D: np.ndarray
    test_I: np.ndarray

    @property
    def n(self) -> int:
        return len(self.x)

    def loo(self, member: np.ndarray | None = None, k: int = 2) -> np.ndarray:
        """Every normal row's mean distance to its k nearest OTHER members (all rows when
        None): leave-one-out for members, plain kNN for the others."""
        if member is None:
            return self.loo_D[:, :k].mean(axis=1, dtype=np.float64)

        def redo(rows: np.ndarray) -> np.ndarray:
            ids = np.flatnonzero(member)
            D, I = search(self.x[rows], self.x[ids], k + 1)
            self_hit = ids[I] == rows[:, None]
            keep = ~self_hit
            keep[~self_hit.any(axis=1), -1] = False
            return np.array([d[kk][:k].mean() for d, kk in zip(D, keep, strict=True)])
        return member_scores(self.loo_D, self.loo_I, member, k, redo)

    def test_scores(self, test: np.ndarray, member: np.ndarray | None = None, k: int = 2
                    ) -> np.ndarray:
        if member is None:
            return self.test_D[:, :k].mean(axis=1, dtype=np.float64)

        def redo(rows: np.ndarray) -> np.ndarray:
            return search(test[rows], self.x[member], k)[0].mean(axis=1, dtype=np.float64)
        return member_scores(self.test_D, self.test_I, member, k, redo)


def class_lists(data: Data, key: str, x: np.ndarray, work: str) -> ClassLists:
    """Neighbour lists of the normal set x (cached under work/{dataset}/{key}.npz)."""
    path = os.path.join(work, data.name, f"{key}.npz")
    if os.path.exists(path):
        z = np.load(path)
        if z["loo_D"].shape[0] == len(x):
            return ClassLists(x, z["loo_D"], z["loo_I"], z["test_D"], z["test_I"])
    t0 = time.perf_counter()
    loo_D, loo_I = search_loo(x, DEEP_LOO)
    test_D, test_I = search(data.test, x, DEEP_TEST)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, loo_D=loo_D, loo_I=loo_I.astype(np.int32), test_D=test_D,
             test_I=test_I.astype(np.int32))
    LOG.info("neighbour lists %s/%s: %.1f s", data.name, key, time.perf_counter() - t0)
    return ClassLists(x, loo_D, loo_I, test_D, test_I)


def normal_lists(data: Data, c: int, work: str) -> ClassLists:
    return class_lists(data, f"class{c}", data.train[data.train_idx[c]], work)


# -- measures -------------------------------------------------------------------------


def share_below(p: np.ndarray, alphas: Sequence[float]) -> list[float]:
    return [float(np.mean(p <= a)) for a in alphas]


def binom_interval(m: int, alpha: float, conf: float = 0.99) -> tuple[float, float]:
    """The central ``conf`` interval of Binomial(m, alpha) / m."""
    lo, hi = stats.binom.ppf([(1 - conf) / 2, (1 + conf) / 2], m, alpha)
    return float(lo / m), float(hi / m)


def calib_row(name: str, shares: np.ndarray, ms: Sequence[int], alphas: Sequence[float]
              ) -> dict[str, Any]:
    """shares (classes, alphas): mean, worst classes, within 0.2 alpha, outside the 99%
    binomial interval (low: too conservative; high: too many normals flagged)."""
    row: dict[str, Any] = {"reference": name}
    for j, a in enumerate(alphas):
        col = shares[:, j]
        below = above = 0
        for i, m in enumerate(ms):
            lo, hi = binom_interval(m, a)
            below += col[i] < lo - 1e-12
            above += col[i] > hi + 1e-12
        row[f"{a:g}"] = {"mean": float(col.mean()), "min": float(col.min()),
                         "max": float(col.max()),
                         "mean_within_0.2a": bool(abs(col.mean() - a) <= 0.2 * a),
                         "classes_below_99": int(below), "classes_above_99": int(above)}
    return row


def other_class(data: Data, c: int) -> np.ndarray:
    return np.flatnonzero(data.test_labels != c)


# -- tables ---------------------------------------------------------------------------


def table_auc(data: Data, work: str, **_: Any) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    aucs = []
    for c in data.train_idx:
        cl = normal_lists(data, c, work)
        aucs.append(float(roc_auc_score(data.test_labels != c, cl.test_scores(data.test))))
    return {"per_class": [round(a, 4) for a in aucs], "mean": round(float(np.mean(aucs)), 4)}


def table_calibration(data: Data, work: str, alphas: Sequence[float], sample: int,
                      seed: int, **_: Any) -> list[dict[str, Any]]:
    """Share of the class's test normals with p <= alpha, per reference and p-value."""
    rng = np.random.default_rng(seed)
    variants = {}
    ms = []
    for c in data.train_idx:
        cl = normal_lists(data, c, work)
        normal = data.test_labels == c
        ms.append(int(normal.sum()))
        s = cl.test_scores(data.test)[normal]
        loo = cl.loo()
        refs = {"all normals": loo}
        if sample < cl.n:
            refs[f"sample of {sample}"] = rng.choice(loo, sample, replace=False)
        for rname, ref in refs.items():
            ref = np.sort(ref)
            tails = (("rank", None), ("rank + tail", fit_tail(ref)),
                     ("rank + tail, sqrt(n) exceedances",
                      fit_tail(ref, round(np.sqrt(len(ref))))))
            for pname, t in tails:
                p, used = p_values(s, ref, t)
                key = f"{rname}, {pname}"
                variants.setdefault(key, []).append(share_below(p, alphas))
                variants.setdefault(key + " (tail rows)", []).append([float(used.mean())])
    rows = []
    for key, v in variants.items():
        if key.endswith("(tail rows)"):
            continue
        row = calib_row(key, np.array(v), ms, alphas)
        row["per_class"] = [[round(x, 4) for x in r] for r in v]
        row["tail_share"] = float(np.mean(variants[key + " (tail rows)"]))
        rows.append(row)
    return rows


def table_exchange(data: Data, work: str, alphas: Sequence[float], seed: int,
                   held: float = 1 / 6, **_: Any) -> dict[str, Any]:
    """Random held-out training normals scored against the rest (exactly exchangeable):
    p from the rest's LOO scores (each against n - 1 others; dn2) against full conformal
    (each reference score recomputed with the held-out image added: exact), and the test
    normals' share against the same reference (the train/test difference)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[float]]] = {"LOO reference (dn2)": [], "full conformal": []}
    diffs, ratio = [], []
    ms = []
    for c in data.train_idx:
        cl = normal_lists(data, c, work)
        n = cl.n
        h = rng.permutation(n)[:max(1, round(held * n))]
        member = np.ones(n, bool)
        member[h] = False
        ref_ids = np.flatnonzero(member)
        cos = (cl.x[ref_ids] @ cl.x[h].T).astype(np.float64)  # unit rows: (n_ref, h)
        d_new = np.sqrt(np.maximum(2 - 2 * cos, 0))  # distance of each ref to each new
        loo_all = cl.loo(member, 2)
        s_new = loo_all[h]  # held-out: kNN among members
        ref = loo_all[ref_ids]
        # the reference's 2 nearest among the members
        Dm = _first_members(cl.loo_D, cl.loo_I, member, 2, cl)[ref_ids]
        a, b = Dm[:, :1], Dm[:, 1:2]
        full = np.where(d_new < a, (d_new + a) / 2, np.where(d_new < b, (a + d_new) / 2,
                                                             (a + b) / 2))
        p_full = (1 + (full >= s_new[None, :]).sum(axis=0)) / (len(ref) + 1)
        p_loo = p_values(s_new, np.sort(ref))[0]
        out["LOO reference (dn2)"].append(share_below(p_loo, alphas))
        out["full conformal"].append(share_below(p_full, alphas))
        diffs.append(float(np.mean(p_loo - p_full)))
        ratio.append(float(np.median(s_new) / np.median(ref)))
        ms.append(len(h))
    rows = [calib_row(k, np.array(v), ms, alphas) for k, v in out.items()]
    return {"rows": rows, "held_out_per_class": ms,
            "mean_p_loo_minus_full": float(np.mean(diffs)),
            "max_p_loo_minus_full": float(np.max(diffs)),
            "median_score_ratio_new_over_ref": [round(r, 4) for r in ratio]}


def _first_members(D: np.ndarray, I: np.ndarray, member: np.ndarray, k: int,
                   cl: ClassLists) -> np.ndarray:
    """Distances (n, k) to the first k members in the lists (exact search for the rest)."""
    ok = member[I]
    rank = np.cumsum(ok, axis=1)
    out = np.full((len(D), k), np.nan)
    for j in range(k):
        sel = ok & (rank == j + 1)
        has = sel.any(axis=1)
        out[has, j] = D[has][sel[has]]
    short = np.flatnonzero(np.isnan(out).any(axis=1))
    if len(short):
        ids = np.flatnonzero(member)
        Ds, Is = search(cl.x[short], cl.x[ids], k + 1)
        for r, d, i in zip(short, Ds, Is, strict=True):
            out[r] = d[ids[i] != r][:k]
    return out


def table_tail(data: Data, work: str, seed: int, sizes: Sequence[int] = (100, 300, 1000),
               draws: int = 5, exceed: Sequence[int | None] = (None, 25, 100, 250),
               levels: Sequence[float] = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5),
               **_: Any) -> list[dict[str, Any]]:
    """Reference = a uniform sample of n_ref of the class's LOO scores; held-out = every
    other normal's LOO score (exchangeable with the sample) and the test normals. The
    share with p <= level, pooled over classes and draws, for rank p-values and tails
    fitted over n_exceed exceedances (shape >= 0, or free)."""
    rng = np.random.default_rng(seed)
    acc: dict[tuple, dict[str, Any]] = {}
    for c in data.train_idx:
        cl = normal_lists(data, c, work)
        loo = cl.loo()
        s_test = cl.test_scores(data.test)[data.test_labels == c]
        for n_ref in sizes:
            if n_ref >= cl.n - 20:
                continue
            for _ in range(draws):
                pick = rng.permutation(cl.n)
                ref, held = np.sort(loo[pick[:n_ref]]), loo[pick[n_ref:]]
                variants: list[tuple[str, Tail | None]] = [("rank", None)]
                for ne in exceed:
                    ne_eff = default_exceedances(n_ref) if ne is None else ne
                    if ne_eff >= n_ref // 2 + 1:
                        continue
                    name = f"tail n_exceed={'default ' if ne is None else ''}{ne_eff}"
                    variants.append((f"{name}, shape>=0", fit_tail(ref, ne_eff)))
                    if ne is None:  # the free shape, and the tail beyond the maximum only
                        variants.append((f"{name}, free shape",
                                         fit_tail(ref, ne_eff, min_shape=None)))
                        variants.append((f"{name}, shape>=0, switch=1",
                                         fit_tail(ref, ne_eff, switch=1)))
                for vname, t in variants:
                    a = acc.setdefault((n_ref, vname), {"held": np.zeros(len(levels)),
                                                        "n_held": 0,
                                                        "test": np.zeros(len(levels)),
                                                        "n_test": 0, "shapes": []})
                    ph = p_values(held, ref, t)[0]
                    pt = p_values(s_test, ref, t)[0]
                    a["held"] += [(ph <= lv).sum() for lv in levels]
                    a["test"] += [(pt <= lv).sum() for lv in levels]
                    a["n_held"] += len(held)
                    a["n_test"] += len(pt)
                    if t is not None:
                        a["shapes"].append(t.shape)
    rows = []
    for (n_ref, vname), a in sorted(acc.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        rows.append({"n_ref": n_ref, "p": vname,
                     "held": {f"{lv:g}": [int(x), round(x / a["n_held"] / lv, 3)]
                              for lv, x in zip(levels, a["held"], strict=True)},
                     "test": {f"{lv:g}": [int(x), round(x / a["n_test"] / lv, 3)]
                              for lv, x in zip(levels, a["test"], strict=True)},
                     "n_held": a["n_held"], "n_test": a["n_test"],
                     "shape_median": (round(float(np.median(a["shapes"])), 3)
                                      if a["shapes"] else None)})
    return rows


def clean_mask(cl: ClassLists, fraction: float, within: np.ndarray | None = None
               ) -> np.ndarray:
    """Kept mask (n,): drop round(fraction x |within|) rows of ``within`` (all when None)
    with the highest LOO score over min(CLEAN_K, n - 1) neighbours among ``within``."""
    n = cl.n
    within = np.ones(n, bool) if within is None else within
    ids = np.flatnonzero(within)
    kept = within.copy()
    n_drop = round(fraction * len(ids))
    if n_drop <= 0:
        return kept
    kc = min(CLEAN_K, len(ids) - 1)
    if within.all():
        score = cl.loo_D[:, :kc].mean(axis=1, dtype=np.float64)
    else:
        score = search_loo(cl.x[ids], kc)[0].mean(axis=1, dtype=np.float64)
    kept[ids[np.argsort(-score, kind="stable")[:n_drop]]] = False
    return kept


def _bh_power(p_normal: np.ndarray, p_anom: np.ndarray, q: float, n_anom: int, draws: int,
              rng: np.random.Generator) -> tuple[float, float]:
    """Mean (FDP, power) of BH at q over partitions of all normals + n_anom anomalies."""
    fdp, power = [], []
    for _ in range(draws):
        pa = p_anom[rng.choice(len(p_anom), n_anom, replace=False)]
        f = bh_flags(np.concatenate([p_normal, pa]), q)
        fa = f[len(p_normal):].sum()
        fn = f[:len(p_normal)].sum()
        fdp.append(fn / max(1, fn + fa))
        power.append(fa / n_anom)
    return float(np.mean(fdp)), float(np.mean(power))


def table_cleaning(data: Data, work: str, alphas: Sequence[float], seed: int,
                   fractions: Sequence[float] = (0.0, 0.02, 0.05),
                   impurities: Sequence[float] = (0.05, 0.10), cal: float = 0.2,
                   **_: Any) -> list[dict[str, Any]]:
    """Reference after cleaning, three ways: (A) the kept images' LOO scores among the
    kept (truncated), (B) every normal image's score against the kept set (removed ones
    included), (C) a calibration split (``cal`` of the images) kept out of cleaning and
    the index, scored against the index. Share of test normals with p <= alpha, and BH
    (Q = 0.1) with 10% anomalies. Clean sets: drop the top x% (LOO over k=200);
    contaminated: other classes' training images at rate r, cleaned at r."""
    rng = np.random.default_rng(seed)
    cases = [("clean", x) for x in fractions] + [("impure", r) for r in impurities]
    rows = []
    for kind, x in cases:
        acc: dict[str, dict[str, list]] = {}
        ms = []
        for c in data.train_idx:
            idx = data.train_idx[c]
            if kind == "impure":
                others = np.flatnonzero(data.train_labels != c)
                pick = np.random.default_rng([seed, int(c), round(1000 * x)])  # cached lists
                bad = pick.choice(others, round(x * len(idx) / (1 - x)), replace=False)
                xs = data.train[np.concatenate([idx, bad])]
                cl = class_lists(data, f"class{c}-impure{x:g}-seed{seed}", xs, work)
            else:
                cl = normal_lists(data, c, work)
            normal = data.test_labels == c
            ms.append(int(normal.sum()))
            anom = other_class(data, c)
            kept = clean_mask(cl, x)
            s_test = cl.test_scores(data.test, kept)
            all_vs_kept = cl.loo(kept)
            # (C): calibration split out of cleaning and the index
            is_cal = np.zeros(cl.n, bool)
            is_cal[rng.permutation(cl.n)[:round(cal * cl.n)]] = True
            kept_c = clean_mask(cl, x, within=~is_cal)
            s_test_c = cl.test_scores(data.test, kept_c)
            refs = {"A: kept images' LOO (truncated)": (all_vs_kept[kept], s_test),
                    "B: all images against the kept set": (all_vs_kept, s_test),
                    f"C: calibration split ({cal:.0%}) against the index":
                        (cl.loo(kept_c)[is_cal], s_test_c)}
            for name, (ref, s) in refs.items():
                ref = np.sort(ref)
                p = p_values(s, ref, fit_tail(ref))[0]
                a = acc.setdefault(name, {"shares": [], "fdp": [], "power": []})
                a["shares"].append(share_below(p[normal], alphas))
                f, pw = _bh_power(p[normal], p[anom], 0.1, round(ms[-1] / 9), 5, rng)
                a["fdp"].append(f)
                a["power"].append(pw)
        for name, a in acc.items():
            row = calib_row(name, np.array(a["shares"]), ms, alphas)
            row.update(case=f"{kind} {x:.0%}", bh_q0_1_fdp=float(np.mean(a["fdp"])),
                       bh_q0_1_power=float(np.mean(a["power"])))
            rows.append(row)
        LOG.info("cleaning %s %.2f done", kind, x)
    return rows


def table_kmeans(data: Data, work: str, alphas: Sequence[float], seed: int,
                 centres: Sequence[int] = (1, 10, 50), folds: int = 5, split: float = 0.2,
                 **_: Any) -> list[dict[str, Any]]:
    """K-means index (distance to the nearest of C centres): reference in-sample (dn2
    now), of a held-out split (centres fitted on the rest), or cross-fitted (centres of
    the index fitted on all; each image's reference score from centres fitted without its
    fold). Share of test normals with p <= alpha; BH (Q = 0.1) at 10% anomalies."""
    import faiss

    rng = np.random.default_rng(seed)

    def fit(x: np.ndarray, C: int) -> np.ndarray:
        mu = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        km = faiss.Kmeans(x.shape[1], C, niter=20, seed=1234, max_points_per_centroid=len(x),
                          min_points_per_centroid=1, verbose=False)
        km.train(np.ascontiguousarray(x - mu))
        return km.centroids + mu

    def dist(q: np.ndarray, cen: np.ndarray) -> np.ndarray:
        return search(q, cen, 1)[0][:, 0].astype(np.float64)

    rows = []
    for C in centres:
        acc: dict[str, dict[str, list]] = {}
        ms = []
        for c in data.train_idx:
            x = data.train[data.train_idx[c]]
            normal = data.test_labels == c
            ms.append(int(normal.sum()))
            cen = fit(x, C)
            s = dist(data.test, cen)
            perm = rng.permutation(len(x))
            held = perm[:round(split * len(x))]
            rest = np.setdiff1d(np.arange(len(x)), held)
            cen_split = fit(x[rest], C)
            crossfit = np.empty(len(x))
            for f in range(folds):
                part = perm[f::folds]
                crossfit[part] = dist(x[part], fit(x[np.setdiff1d(perm, part)], C))
            refs = {"in-sample (dn2 now)": (dist(x, cen), s),
                    f"held-out split ({split:.0%}; index on the rest)":
                        (dist(x[held], cen_split), dist(data.test, cen_split)),
                    f"cross-fitted ({folds} folds; index on all)": (crossfit, s)}
            for name, (ref, sc) in refs.items():
                ref = np.sort(ref)
                p = p_values(sc, ref, fit_tail(ref))[0]
                a = acc.setdefault(name, {"shares": [], "fdp": [], "power": []})
                a["shares"].append(share_below(p[normal], alphas))
                f_, pw = _bh_power(p[normal], p[other_class(data, c)], 0.1,
                                   round(ms[-1] / 9), 5, rng)
                a["fdp"].append(f_)
                a["power"].append(pw)
        for name, a in acc.items():
            row = calib_row(name, np.array(a["shares"]), ms, alphas)
            row.update(C=C, bh_q0_1_fdp=float(np.mean(a["fdp"])),
                       bh_q0_1_power=float(np.mean(a["power"])))
            rows.append(row)
        LOG.info("kmeans C=%d done", C)
    return rows


def default_p(data: Data, cl: ClassLists, tail: bool = True
              ) -> tuple[np.ndarray, np.ndarray, Tail | None]:
    """(p of every test image, tail used, tail) against the class's default reference:
    the LOO scores of min(REFERENCE_SAMPLE, n) normal images, rank + tail."""
    ref = np.sort(cl.loo())  # n <= REFERENCE_SAMPLE in these protocols: all of them
    t = fit_tail(ref) if tail else None
    p, used = p_values(cl.test_scores(data.test), ref, t)
    return p, used, t


def table_bh(data: Data, work: str, fdr: Sequence[float], mix: Sequence[float],
             alphas: Sequence[float], seed: int, draws: int = 20, held: float = 1 / 6,
             **_: Any) -> list[dict[str, Any]]:
    """Partitions: the class's test normals + other classes' test images at ``mix``
    (share of the partition). BH at each Q: FDP, power (per class, mean over draws); and
    p <= alpha flags: share of normals and anomalies flagged. Also with exchangeable
    normals: the index and its reference a random ``1 - held`` of the training normals,
    the partition's normals the held-out rest (anomalies: other classes' test images)."""
    rng = np.random.default_rng(seed)
    rows = []
    variants = (("rank + tail", True, None), ("rank only", False, None),
                ("rank + tail, held-out training normals (exchangeable)", True, held))
    for pname, with_tail, out in variants:
        res: dict[tuple, list] = {}
        for c in data.train_idx:
            cl = normal_lists(data, c, work)
            if out is None:
                p, _, _ = default_p(data, cl, with_tail)
                pn, pa = p[data.test_labels == c], p[other_class(data, c)]
            else:
                member = np.ones(cl.n, bool)
                member[rng.permutation(cl.n)[:round(out * cl.n)]] = False
                all_vs = cl.loo(member)
                ref = np.sort(all_vs[member])
                tail = fit_tail(ref)
                pn = p_values(all_vs[~member], ref, tail)[0]
                pa = p_values(cl.test_scores(data.test, member)[other_class(data, c)], ref,
                              tail)[0]
            m0 = len(pn)
            for r in mix:
                n_anom = max(1, round(r * m0 / (1 - r)))
                for q in fdr:
                    res.setdefault((r, q), []).append(_bh_power(pn, pa, q, n_anom, draws, rng))
            for a in alphas:
                res.setdefault(("alpha", a), []).append(
                    (float(np.mean(pn <= a)), float(np.mean(pa <= a))))
        for key, v in res.items():
            v = np.array(v)
            if key[0] == "alpha":
                rows.append({"p": pname, "flags": f"p <= {key[1]:g}",
                             "normals_flagged": float(v[:, 0].mean()),
                             "anomalies_flagged": float(v[:, 1].mean())})
            else:
                rows.append({"p": pname, "flags": f"BH Q={key[1]:g}", "anomalies": key[0],
                             "q_m0_over_m": round(key[1] * (1 - key[0]), 4),
                             "fdp_mean": float(v[:, 0].mean()),
                             "fdp_max_class": float(v[:, 0].max()),
                             "power_mean": float(v[:, 1].mean()),
                             "power_min_class": float(v[:, 1].min()),
                             "per_class_power": [round(x, 3) for x in v[:, 1]]})
    return rows


def table_night(data: Data, work: str, fdr: Sequence[float], seed: int,
                night: int = 40_000, planted: int = 12, index_share: float = 2 / 3,
                nights: int = 20, **_: Any) -> list[dict[str, Any]]:
    """A night of ``night`` images, ``planted`` of them other classes' test images, the
    rest drawn with replacement from a pool of normals the index never saw: the class's
    test normals + the training normals left out of the index (the index and its
    reference: a random ``index_share`` of the class's training normals)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in data.train_idx:
        cl = normal_lists(data, c, work)
        member = np.zeros(cl.n, bool)
        member[rng.permutation(cl.n)[:round(index_share * cl.n)]] = True
        all_vs = cl.loo(member)
        ref = np.sort(all_vs[member])
        tail = fit_tail(ref)
        s_test = cl.test_scores(data.test, member)
        pool = np.concatenate([all_vs[~member], s_test[data.test_labels == c]])
        anom = s_test[other_class(data, c)]
        for pname, t in (("rank + tail", tail), ("rank only", None)):
            p_pool, _ = p_values(pool, ref, t)
            p_anom, used_a = p_values(anom, ref, t)
            for q in fdr:
                got = []
                for _ in range(nights):
                    pick = rng.integers(0, len(pool), night - planted)
                    ai = rng.choice(len(anom), planted, replace=False)
                    f = bh_flags(np.concatenate([p_pool[pick], p_anom[ai]]), q)
                    fn = f[:night - planted]
                    got.append((fn.sum(), len(np.unique(pick[fn])), f[night - planted:].sum()))
                g = np.array(got)
                rows.append({"class": int(c), "p": pname, "Q": q, "n_ref": len(ref),
                             "pool": len(pool), "normals_flagged": float(g[:, 0].mean()),
                             "distinct_normals_flagged": float(g[:, 1].mean()),
                             "anomalies_flagged": float(g[:, 2].mean()),
                             "nights_with_normal_flagged": float(np.mean(g[:, 0] > 0)),
                             "tail_shape": None if t is None else round(t.shape, 3)})
    return rows


def table_drift(data: Data, work: str, cache: str, seed: int,
                levels: Sequence[float] = (0.01, 0.001),
                sizes: Sequence[int] = (200, 1000, 3000),
                draws: int = 50, noise: Sequence[float] = (0.001, 0.002, 0.005, 0.01, 0.02,
                                                           0.05),
                lowers: Sequence[float] = (0.2, 0.5), **_: Any) -> dict[str, Any]:
    """KS test of p | p > 0.2 against U(0.2, 1]: share of partitions warned, one-sample
    and with the reference's noise (two-sample effective size). Partitions of ``size``
    rows (capped at the class's test normals) drawn without replacement: clean test
    normals; held-out training normals (exchangeable: reference = a random half of the
    LOO scores); normals + 10% / 50% anomalies; normals with Gaussian noise (sigma x the
    per-dimension sd of the class's raw training features) added to their raw features;
    another class's test images."""
    from dn2ops import transforms

    rng = np.random.default_rng(seed)
    raw = raw_test(cache, data.name)
    raw_tr = raw_train(cache, data.name)
    counts: dict[tuple, list] = {}
    moved: dict[str, list] = {}

    def record(case: str, size: int, p: np.ndarray, n_ref: int, drawn: int) -> None:
        for _ in range(drawn):
            sub = p if len(p) <= size else p[rng.choice(len(p), size, replace=False)]
            for lower in lowers:
                one = drift_test(sub, lower=lower)[1]
                two = drift_test(sub, lower=lower, n_reference=n_ref)[1]
                for lv in levels:
                    counts.setdefault((case, size, lower, lv), []).append(
                        (one < lv, two < lv, np.isnan(two)))

    for c in data.train_idx:
        cl = normal_lists(data, c, work)
        ref = np.sort(cl.loo())
        tail = fit_tail(ref)
        p_all = p_values(cl.test_scores(data.test), ref, tail)[0]
        normal = data.test_labels == c
        pn = p_all[normal]
        anom_p = p_all[other_class(data, c)]
        loo = cl.loo()
        half = rng.permutation(cl.n)
        ref_h = np.sort(loo[half[:cl.n // 2]])
        p_held = p_values(loo[half[cl.n // 2:]], ref_h, fit_tail(ref_h))[0]
        sd = raw_tr[data.train_idx[c]].std(axis=0)
        xn = np.asarray(raw[normal], dtype=np.float32)
        noisy = {}
        for sigma in noise:
            xq = transforms.apply(xn + sigma * sd * rng.standard_normal(xn.shape,
                                                                        dtype=np.float32),
                                  TRANSFORM)
            s = search(xq, cl.x, 2)[0].mean(axis=1, dtype=np.float64)
            noisy[sigma] = p_values(s, ref, tail)[0]
            moved.setdefault(f"noise {sigma:g}", []).append(
                (float(np.median(noisy[sigma])), float(np.mean(bh_flags(noisy[sigma], 0.05)))))
        oc = (c + 1) % len(data.train_idx)
        p_other = p_all[data.test_labels == oc]
        moved.setdefault("another class (all)", []).append(
            (float(np.median(p_other)), float(np.mean(bh_flags(p_other, 0.05)))))
        moved.setdefault("none (clean test normals)", []).append(
            (float(np.median(pn)), float(np.mean(bh_flags(pn, 0.05)))))
        for size in sizes:
            if size <= len(p_held):
                record("held-out training normals (exchangeable)", size, p_held, len(ref_h),
                       1 if size == len(p_held) else draws)
            if size > len(pn):
                continue
            m = size
            dr = 1 if m == len(pn) else draws
            record("clean test normals", size, pn, cl.n, dr)
            for r in (0.1, 0.5):
                na = round(r * m)
                for _ in range(dr):
                    sub = np.concatenate([pn[rng.choice(len(pn), m - na, replace=False)],
                                          anom_p[rng.choice(len(anom_p), na, replace=False)]])
                    record(f"normals + {r:.0%} anomalies", size, sub, cl.n, 1)
            for sigma, pz in noisy.items():
                record(f"normals, noise sigma={sigma:g}", size, pz, cl.n, dr)
            record("another class's test images", size, p_other, cl.n, dr)
    rows = []
    for (case, size, lower, lv), v in counts.items():
        v = np.array(v)
        rows.append({"partition": case, "size": size, "lower": lower, "ks_level": lv,
                     "warned_one_sample": float(v[:, 0].mean()),
                     "warned_two_sample": float(v[:, 1].mean()),
                     "too_few_rows": float(v[:, 2].mean()), "tests": len(v)})
    return {"rows": rows, "shift": {k: {"median_p": float(np.mean([a for a, _ in v])),
                                        "bh_0.05_flagged": float(np.mean([b for _, b in v]))}
                                    for k, v in moved.items()}}


# -- report ---------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render(res: dict[str, Any]) -> str:
    from benchmarks.markdown import table

    out = [f"# DN2 p-values: {res['dataset']} (k=2, {TRANSFORM}, exact)", ""]
    alphas = [f"{a:g}" for a in res["alphas"]]

    def calib(rows: list[dict[str, Any]], extra: Sequence[str] = ()) -> str:
        head = [*extra, "reference / p", *(f"a={a}: mean [min, max] (out 99%: low/high)"
                                           for a in alphas)]
        body = []
        for r in rows:
            cells = []
            for a in alphas:
                x = r[a]
                mark = "" if x["mean_within_0.2a"] else " *"
                cells.append(f"{_pct(x['mean'])}{mark} [{_pct(x['min'])}, {_pct(x['max'])}] "
                             f"({x['classes_below_99']}/{x['classes_above_99']})")
            body.append([*(str(r.get(e, "")) for e in extra), r["reference"], *cells])
        return table(head, body)

    if "auc" in res:
        out += [f"ROC-AUC (check): mean {res['auc']['mean']}, per class "
                f"{res['auc']['per_class']}", ""]
    if "calibration" in res:
        out += ["## Calibration: share of test normals with p <= alpha", "",
                calib(res["calibration"]), "",
                "`*`: mean over classes outside alpha +- 0.2 alpha; (low/high): classes below "
                "/ above the 99% binomial interval of their test normals around alpha.", "",
                "Rows given by the tail: " + ", ".join(
                    f"{r['reference']}: {_pct(r['tail_share'])}" for r in res["calibration"]
                    if "tail" in r["reference"]), ""]
    if "exchange" in res:
        e = res["exchange"]
        out += ["## n - 1 against n: held-out training normals (exchangeable)", "",
                calib(e["rows"]), "",
                f"Mean p(LOO reference) - p(full conformal): {e['mean_p_loo_minus_full']:.5f}"
                f" (max over classes {e['max_p_loo_minus_full']:.5f}); median score of a "
                f"held-out image / median LOO score: {e['median_score_ratio_new_over_ref']}",
                ""]
    if "tail" in res:
        levels = list(res["tail"][0]["held"])
        out += ["## Tail beyond the rank resolution (held-out normals; pooled counts, "
                "observed / expected)", "",
                table(["n_ref", "p", "shape (median)",
                       *(f"held {lv}" for lv in levels), *(f"test {lv}" for lv in levels)],
                      [[r["n_ref"], r["p"], r["shape_median"],
                        *(f"{r['held'][lv][0]} ({r['held'][lv][1]:.2f})" for lv in levels),
                        *(f"{r['test'][lv][0]} ({r['test'][lv][1]:.2f})" for lv in levels)]
                       for r in res["tail"]]), "",
                f"held: {res['tail'][0]['n_held']} held-out LOO scores per n_ref (pooled); "
                f"test: {res['tail'][0]['n_test']} test-normal p-values.", ""]
    if "cleaning" in res:
        out += ["## Cleaning and the reference", "",
                calib(res["cleaning"], extra=("case",)), "",
                table(["case", "reference", "BH Q=0.1, 10% anomalies: FDP", "power"],
                      [[r["case"], r["reference"], f"{r['bh_q0_1_fdp']:.3f}",
                        f"{r['bh_q0_1_power']:.3f}"] for r in res["cleaning"]]), ""]
    if "kmeans" in res:
        out += ["## K-means reference", "", calib(res["kmeans"], extra=("C",)), "",
                table(["C", "reference", "BH Q=0.1, 10% anomalies: FDP", "power"],
                      [[r["C"], r["reference"], f"{r['bh_q0_1_fdp']:.3f}",
                        f"{r['bh_q0_1_power']:.3f}"] for r in res["kmeans"]]), ""]
    if "bh" in res:
        bh = [r for r in res["bh"] if "anomalies" in r]
        al = [r for r in res["bh"] if "anomalies" not in r]
        out += ["## Benjamini-Hochberg on mixed test partitions", "",
                table(["p", "flags", "anomalies", "Q m0/m", "FDP mean", "FDP worst class",
                       "power mean", "power worst class"],
                      [[r["p"], r["flags"], f"{r['anomalies']:.0%}", r["q_m0_over_m"],
                        f"{r['fdp_mean']:.4f}",
                        f"{r['fdp_max_class']:.4f}", f"{r['power_mean']:.3f}",
                        f"{r['power_min_class']:.3f}"] for r in bh]), "",
                table(["p", "flags", "normals flagged", "anomalies flagged"],
                      [[r["p"], r["flags"], _pct(r["normals_flagged"]),
                        _pct(r["anomalies_flagged"])] for r in al]), ""]
    if "night" in res:
        out += ["## A night of 40,000 with 12 planted anomalies (BH)", "",
                table(["class", "p", "Q", "n_ref", "pool", "normals flagged",
                       "distinct normals", "nights with a normal flagged",
                       "anomalies flagged (of 12)", "tail shape"],
                      [[r["class"], r["p"], r["Q"], r["n_ref"], r["pool"],
                        f"{r['normals_flagged']:.2f}", f"{r['distinct_normals_flagged']:.2f}",
                        f"{r['nights_with_normal_flagged']:.2f}",
                        f"{r['anomalies_flagged']:.2f}", r["tail_shape"]]
                       for r in res["night"]]), ""]
        for pn in ("rank + tail", "rank only"):
            for q in sorted({r["Q"] for r in res["night"]}):
                sel = [r for r in res["night"] if r["p"] == pn and r["Q"] == q]
                out.append(f"- {pn}, Q={q:g}: mean over classes {np.mean([r['normals_flagged'] for r in sel]):.2f} "  # noqa: E501
                           f"normals and {np.mean([r['anomalies_flagged'] for r in sel]):.2f} "
                           "anomalies flagged")
        out.append("")
    if "drift" in res:
        d = res["drift"]
        out += ["## Drift: KS test of p | p > 0.2 against U(0.2, 1]", "",
                table(["partition", "size", "p above", "KS level", "warned (one-sample)",
                       "warned (two-sample, reference noise)", "too few rows above", "tests"],
                      [[r["partition"], r["size"], r["lower"], r["ks_level"],
                        f"{r['warned_one_sample']:.3f}", f"{r['warned_two_sample']:.3f}",
                        f"{r['too_few_rows']:.3f}", r["tests"]]
                       for r in sorted(d["rows"], key=lambda r: (r["lower"], r["ks_level"],
                                                                 r["size"]))]), "",
                table(["shift", "median p (mean over classes)", "share flagged, BH 0.05"],
                      [[k, f"{v['median_p']:.3f}", f"{v['bh_0.05_flagged']:.3f}"]
                       for k, v in d["shift"].items()]), ""]
    if "default" in res:
        out += ["## The default: auto cleaning (rate not given), reference of all rows "
                "against the kept set", "",
                calib(res["default"], extra=("case",)), "",
                table(["case", "removed (mean)", "anomalies", "Q", "FDP mean",
                       "FDP worst class", "power mean", "power worst class"],
                      [[r["case"], _pct(r["removed_mean"]), f"{b['anomalies']:.0%}", b["Q"],
                        f"{b['fdp_mean']:.4f}", f"{b['fdp_max_class']:.4f}",
                        f"{b['power_mean']:.3f}", f"{b['power_min_class']:.3f}"]
                       for r in res["default"] for b in r["bh"]]), ""]
    if "null" in res:
        out += ["## What a test set of this size can tell: the default (clean sets) beside "
                "exactly valid p-values", "",
                table(["figure", "observed", "meets the goal", "exactly valid p: mean "
                       "[5 %, 95 %]", "exactly valid p meet the goal", "exactly valid p at "
                       "or above the observed"],
                      [[r["figure"], f"{r['observed']:.4f}",
                        "" if r["meets_goal"] is None else str(r["meets_goal"]),
                        "" if r["null_mean"] is None else
                        f"{r['null_mean']:.4f} [{r['null_p5']:.4f}, {r['null_p95']:.4f}]",
                        "" if r["null_meets_goal"] is None
                        else f"{r['null_meets_goal']:.0%} of {r['sims']}",
                        "" if r["null_at_or_above_observed"] is None
                        else f"{r['null_at_or_above_observed']:.0%}"] for r in res["null"]]),
                ""]
    return "\n".join(out) + "\n"


# -- command line ---------------------------------------------------------------------


def auto_kept(x: np.ndarray, k: int = 2) -> np.ndarray:
    """dn2's default cleaning, the product's own function (dn2ops.index.cleaning.auto, as a
    build runs it with IndexConfig(clean_fraction="auto") and the command line's sample)."""
    from dn2ops.config import IndexConfig
    from dn2ops.index import cleaning

    config = IndexConfig(k=k, clean_fraction="auto")
    return cleaning.auto(lambda: iter([x]), len(x), config, k + 1).kept


def default_cleaned_p(data: Data, cl: ClassLists
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept mask, sorted reference, p of every test image) as a user's default build
    gives them: auto cleaning, every row's score against the kept set as the reference,
    rank + tail."""
    kept = auto_kept(cl.x)
    ref = np.sort(cl.loo(kept))
    return kept, ref, p_values(cl.test_scores(data.test, kept), ref, fit_tail(ref))[0]


def table_default(data: Data, work: str, alphas: Sequence[float], fdr: Sequence[float],
                  mix: Sequence[float], seed: int,
                  impurities: Sequence[float] = (0.0, 0.05, 0.10), draws: int = 20,
                  **_: Any) -> list[dict[str, Any]]:
    """What a user gets without a flag: the normal set cleaned by the auto rule (not told
    the rate), the index the kept rows, the reference every normal row's score against the
    kept set (removed rows included, as dn2ops.index.calibration builds it), rank + tail.
    Clean sets (0 %) and sets with other classes' training images at rate r (drawn as the
    cleaning table draws them). Share of test normals with p <= alpha; BH at each Q on
    partitions of the class's test normals + other classes' test images at ``mix``."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in impurities:
        shares, ms, removed, bh = [], [], [], {}
        for c in data.train_idx:
            idx = data.train_idx[c]
            if r > 0:
                others = np.flatnonzero(data.train_labels != c)
                pick = np.random.default_rng([seed, int(c), round(1000 * r)])
                bad = pick.choice(others, round(r * len(idx) / (1 - r)), replace=False)
                cl = class_lists(data, f"class{c}-impure{r:g}-seed{seed}",
                                 data.train[np.concatenate([idx, bad])], work)
            else:
                cl = normal_lists(data, c, work)
            kept, ref, p = default_cleaned_p(data, cl)
            removed.append(1 - kept.mean())
            normal = data.test_labels == c
            pn, pa = p[normal], p[other_class(data, c)]
            ms.append(int(normal.sum()))
            shares.append(share_below(pn, alphas))
            for m in mix:
                n_anom = max(1, round(m * len(pn) / (1 - m)))
                for q in fdr:
                    bh.setdefault((m, q), []).append(_bh_power(pn, pa, q, n_anom, draws, rng))
        row = calib_row("auto cleaning, all rows against the kept set, rank + tail",
                        np.array(shares), ms, alphas)
        row.update(case=f"impurities {r:.0%}", removed_mean=float(np.mean(removed)),
                   bh=[{"anomalies": m, "Q": q, "fdp_mean": float(np.mean([v[0] for v in vs])),
                        "fdp_max_class": float(np.max([v[0] for v in vs])),
                        "power_mean": float(np.mean([v[1] for v in vs])),
                        "power_min_class": float(np.min([v[1] for v in vs]))}
                       for (m, q), vs in bh.items()])
        rows.append(row)
        LOG.info("default, impurities %.2f done", r)
    return rows


def exact_p(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """The p-values of m test scores against a reference of n scores, all n + m drawn from
    one continuous distribution (exchangeable): exactly valid conformal p-values,
    (1 + #{reference >= score}) / (n + 1), sharing one reference as a class's do."""
    ref = np.sort(rng.random(n))
    return (1 + n - np.searchsorted(ref, rng.random(m), side="left")) / (n + 1)


def _goal_figures(pns: Sequence[np.ndarray], pas: Sequence[np.ndarray],
                  alphas: Sequence[float], fdr: Sequence[float], mix: Sequence[float],
                  draws: int, rng: np.random.Generator) -> dict[str, float]:
    """Issue 28's figures over the classes: the mean share of test normals with p <= alpha
    and how many classes fall outside their 99 % binomial interval; BH's mean FDP and
    mean power per (anomaly share, Q)."""
    out: dict[str, float] = {}
    for a in alphas:
        shares = np.array([np.mean(pn <= a) for pn in pns])
        out[f"share {a:g}"] = float(shares.mean())
        out[f"outside {a:g}"] = float(sum(
            not (lo - 1e-12 <= x <= hi + 1e-12)
            for x, (lo, hi) in zip(shares, (binom_interval(len(pn), a) for pn in pns),
                                   strict=True)))
    for m in mix:
        for q in fdr:
            res = [_bh_power(pn, pa, q, max(1, round(m * len(pn) / (1 - m))), draws, rng)
                   for pn, pa in zip(pns, pas, strict=True)]
            out[f"fdp {m:g} {q:g}"] = float(np.mean([r[0] for r in res]))
            out[f"power {m:g} {q:g}"] = float(np.mean([r[1] for r in res]))
    return out


def _meets(name: str, value: float) -> bool | None:
    """Whether one of _goal_figures' values meets issue 28's goal (None: no goal)."""
    kind, *args = name.split()
    if kind == "share":
        return abs(value - float(args[0])) <= 0.2 * float(args[0])
    if kind == "outside":
        return value == 0
    if kind == "fdp":
        return value <= float(args[1])
    if kind == "power" and args == ["0.1", "0.1"]:
        return value >= 0.7
    return None


def table_null(data: Data, work: str, alphas: Sequence[float], fdr: Sequence[float],
               mix: Sequence[float], seed: int, draws: int = 20, sims: int = 200,
               **_: Any) -> list[dict[str, Any]]:
    """What a test set of this size can tell about issue 28's goals. Observed: the
    default on clean sets (auto cleaning, the reference of all rows against the kept set,
    rank + tail, as table_default). Null: the same protocol with each class's test
    normals' p-values replaced by exactly valid ones (``exact_p``: as many test scores,
    a reference of the class's size) and the real anomalies' p-values, ``sims`` times. Per
    figure: the observed value, the null's mean and 5-95 % range, the share of null runs
    that meet the goal (a method whose p-values are exactly valid meets it that often on
    this test set), and the share of null runs at or above the observed value."""
    rng = np.random.default_rng(seed)
    ns, pns, pas = [], [], []
    for c in data.train_idx:
        _, ref, p = default_cleaned_p(data, normal_lists(data, c, work))
        ns.append(len(ref))
        pns.append(p[data.test_labels == c])
        pas.append(p[other_class(data, c)])
    observed = _goal_figures(pns, pas, alphas, fdr, mix, draws, rng)
    null = [_goal_figures([exact_p(n, len(pn), rng) for n, pn in zip(ns, pns, strict=True)],
                          pas, alphas, fdr, mix, draws, rng) for _ in range(sims)]
    LOG.info("null: %d simulations done", sims)
    rows = []
    for name, value in observed.items():
        v = np.array([x[name] for x in null])
        met = [_meets(name, x) for x in v]
        rows.append({"figure": name, "observed": value, "meets_goal": _meets(name, value),
                     "null_mean": float(v.mean()), "null_p5": float(np.quantile(v, 0.05)),
                     "null_p95": float(np.quantile(v, 0.95)),
                     "null_meets_goal": None if met[0] is None else float(np.mean(met)),
                     "null_at_or_above_observed": float(np.mean(v >= value - 1e-12)),
                     "sims": sims})

    def all_met(figures: dict[str, float]) -> bool:
        return all(m for m in (_meets(k, v) for k, v in figures.items()) if m is not None)

    rows.append({"figure": "every goal at once", "observed": float(all_met(observed)),
                 "meets_goal": all_met(observed), "null_mean": None, "null_p5": None,
                 "null_p95": None,
                 "null_meets_goal": float(np.mean([all_met(x) for x in null])),
                 "null_at_or_above_observed": None, "sims": sims})
    return rows


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("fmnist", "digits"), default="fmnist")
    p.add_argument("--cache", default=os.path.join("bench-out", "accuracy", "features"),
                   help="features: CACHE/{dataset}/{backbone}/{train,test}.npy")
    p.add_argument("--work", default=os.path.join("bench-out", "calibration"),
                   help="neighbour lists and results")
    p.add_argument("--tables", default=",".join(TABLES))
    p.add_argument("--alphas", type=_floats, default=[0.001, 0.01, 0.05, 0.1])
    p.add_argument("--fdr", type=_floats, default=[0.05, 0.1], help="BH levels Q")
    p.add_argument("--mix", type=_floats, default=[0.01, 0.1, 0.5],
                   help="share of anomalies in the BH partitions")
    p.add_argument("--sample", type=int, default=1000,
                   help="a smaller reference sample, beside all normals")
    p.add_argument("--tail-sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[100, 300, 1000, 3000])
    p.add_argument("--train-per-class", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--null-sims", type=int, default=200,
                   help="simulations of exactly valid p-values (table null)")
    args = p.parse_args(argv)
    args.tables = [t for t in args.tables.split(",") if t]
    bad = set(args.tables) - set(TABLES)
    if bad:
        p.error(f"unknown tables {sorted(bad)}; choose from {TABLES}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import faiss

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    faiss.omp_set_num_threads(args.threads)
    data = load(args.cache, args.dataset, args.train_per_class)
    out_dir = os.path.join(args.work, data.name)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    res: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
    res.update(dataset=data.name, alphas=args.alphas)
    res.setdefault("seconds", {})
    kw = dict(data=data, work=args.work, alphas=args.alphas, fdr=args.fdr, mix=args.mix,
              sample=args.sample, seed=args.seed, cache=args.cache)
    fns = {"auc": table_auc, "calibration": table_calibration, "exchange": table_exchange,
           "tail": lambda **k: table_tail(sizes=args.tail_sizes, **k),
           "cleaning": table_cleaning, "kmeans": table_kmeans, "bh": table_bh,
           "night": table_night, "drift": table_drift, "default": table_default,
           "null": lambda **k: table_null(sims=args.null_sims, **k)}
    for name in [t for t in TABLES if t in args.tables]:
        t0 = time.perf_counter()
        res[name] = fns[name](**kw)
        res["seconds"][name] = round(time.perf_counter() - t0, 1)
        LOG.info("%s: %.1f s", name, res["seconds"][name])
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=float)
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write(render(res))
    print(render(res))
    return res


if __name__ == "__main__":
    main()
