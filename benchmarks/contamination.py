"""Normal sets that are not clean (issue 27): cleaning rules that need no rate, measured.

Protocol (benchmarks/accuracy.py's full protocol, its default treatment): each class in turn
is normal (Fashion-MNIST: its first 6000 training images; digits: all its training images),
every test image is scored (DN2, k=2, dn2's default features: the cached
efficientnet_lite0+efficientnet_lite1 features after ``transforms.apply(X, "root4-l2")``),
ROC-AUC with "not the normal class" as positive. Impurities at rate p: round(p n / (1 - p))
random training images of the other classes join the n normal ones (so a fraction p of the
normal set is impure); for each rate a fresh ``numpy.random.default_rng(seed)`` draws them,
classes in order (at p = 5 % this is table_impurities' draw in benchmarks/accuracy.py).

Every rule is a pure function ``rule(X, k) -> kept`` of one normal set's transformed
features X (n, d) float32 and the scoring k: a bool mask (n,) of the rows kept. The test
set is then scored against X[kept].

Columns: no cleaning; today's ``--clean-fraction`` at the TRUE rate (drop round(p n) rows
with the highest leave-one-out mean distance to clean_k = max(k, 200) neighbours), which a
user cannot know; then each rule: mean AUC / share of the impurities removed / share of the
good (normal-class) images removed, mean over the classes and, in brackets, the largest
share one class lost.

The rule measured by default is ``auto``: the product's own function,
``dn2ops.index.cleaning.auto`` with ``IndexConfig(clean_fraction="auto")`` (dn2's default:
its constants in dn2ops.config, scored against the default sample of 5,000 rows). The
others are this script's own numpy versions of the research pass of issue 27 (``exact``:
the same rule as ``auto``, exact, no sample); they share one exact leave-one-out neighbour
search per normal set (``neighbours``), cached for the set being cleaned.

    python benchmarks/contamination.py --dataset fmnist --cache CACHE
        [--rates 0,0.01,0.05,0.1,0.2] [--rules auto,exact,zscore,...] [--seed 0] [--out FILE]

CACHE holds ``{dataset}/efficientnet_lite0+efficientnet_lite1/{train,test}.npy`` (written
by ``benchmarks/accuracy.py embed``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

LOG = logging.getLogger("dn2.bench.contamination")
Rule = Callable[[np.ndarray, int], np.ndarray]

# The research pass's rule (``exact`` below; dn2's auto rule since, dn2ops.config
# CLEAN_AUTO_*): neighbourhood k' = 5 % of the rows (at least MIN_K), a row is dropped when
# the log of its mean distance to its k' nearest kept rows is more than
# min(RATIO, Z x 1.4826 MAD) above the kept rows' median; repeated until stable.
FRACTION = 0.05
MIN_K = 10
RATIO = 0.25  # log units: a neighbourhood 28 % farther than the median row's
Z = 3.0
MIN_ROWS = 50  # smaller normal sets are not cleaned
MAX_ROUNDS = 20
SAMPLE = 2000  # rows the streaming form decides on (``sampled``)


# -- neighbours ------------------------------------------------------------------------

_CACHE: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (X, D, I), newest first
_CACHED = 2  # a normal set and the sample ``sampled`` draws from it
_BLOCK = 2048


def _sq_dists(A: np.ndarray, B: np.ndarray, nb: np.ndarray) -> np.ndarray:
    G = A @ B.T
    G *= -2
    G += (A * A).sum(axis=1)[:, None]
    G += nb[None, :]
    np.maximum(G, 0, out=G)
    return G


def exact_neighbours(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest OTHER rows of X (n, d): D float32 (n, k) ascending Euclidean
    distances, I int64 (n, k). Exact (float32 Gram blocks around the mean)."""
    n = len(X)
    k = min(k, n - 1)
    Xc = np.ascontiguousarray(X - X.mean(axis=0, dtype=np.float64).astype(np.float32))
    nb = (Xc * Xc).sum(axis=1)
    D = np.empty((n, k), np.float32)
    I = np.empty((n, k), np.int64)
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        G = _sq_dists(Xc[lo:hi], Xc, nb)
        G[np.arange(hi - lo), np.arange(lo, hi)] = np.inf
        part = np.argpartition(G, k - 1, axis=1)[:, :k] if k < n else np.argsort(G, axis=1)
        d = np.take_along_axis(G, part, axis=1)
        order = np.argsort(d, axis=1, kind="stable")
        I[lo:hi] = np.take_along_axis(part, order, axis=1)
        D[lo:hi] = np.sqrt(np.take_along_axis(d, order, axis=1))
    return D, I


def neighbours(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``exact_neighbours(X, >= k)``, searched once per normal set (the last sets seen, by
    identity) and shared by every rule."""
    k = min(k, len(X) - 1)
    for i, (Y, D, I) in enumerate(_CACHE):
        if Y is X:
            del _CACHE[i]
            if D.shape[1] >= k:
                _CACHE.insert(0, (X, D, I))
                return D, I
            break
    del _CACHE[_CACHED - 1:]  # drop the oldest lists before the new search
    D, I = exact_neighbours(X, k)
    _CACHE.insert(0, (X, D, I))
    return D, I


def kept_mean(X: np.ndarray, kept: np.ndarray, k: int) -> np.ndarray:
    """Mean distance (n,) float64 of every row to its k nearest OTHER kept rows (from the
    cached lists; rows whose list runs out of kept rows are searched again, exactly)."""
    D, I = neighbours(X, 2 * k)
    ok = kept[I]
    count = np.cumsum(ok, axis=1)
    take = ok & (count <= k)
    out = (D * take).sum(axis=1, dtype=np.float64) / k
    short = np.flatnonzero(count[:, -1] < k)
    if len(short):
        cols = np.flatnonzero(kept)
        base = X[cols]
        nb = (base * base).sum(axis=1)
        G = _sq_dists(X[short], base, nb)
        pos = np.searchsorted(cols, short)
        own = (pos < len(cols)) & (cols[np.minimum(pos, len(cols) - 1)] == short)
        G[np.flatnonzero(own), pos[own]] = np.inf
        kk = min(k, G.shape[1] - 1) if own.any() else min(k, G.shape[1])
        out[short] = np.sqrt(np.sort(G, axis=1)[:, :kk]).mean(axis=1)
    return out


def cleaning_k(n: int, k: int, fraction: float = FRACTION) -> int:
    """k' of the rate-free rules: FRACTION of the rows, at least MIN_K and the scoring k."""
    return int(min(n - 1, max(k, MIN_K, round(fraction * n))))


# -- rules -----------------------------------------------------------------------------


def no_cleaning(X: np.ndarray, k: int) -> np.ndarray:
    return np.ones(len(X), bool)


def true_rate(rate: float, clean_k: int = 200) -> Rule:
    """Today's ``--clean-fraction rate`` (needs the rate): drop the round(rate n) rows with
    the highest leave-one-out mean distance to max(k, clean_k) neighbours, lower index
    first among ties (DN2Scorer's rule)."""
    def rule(X: np.ndarray, k: int) -> np.ndarray:
        n = len(X)
        D, _ = neighbours(X, max(k, clean_k))
        loo = D[:, :min(max(k, clean_k), n - 1)].mean(axis=1, dtype=np.float64)
        kept = np.ones(n, bool)
        kept[np.argsort(-loo, kind="stable")[:round(rate * n)]] = False
        return kept
    return rule


def _threshold(X: np.ndarray, k: int, ratio: float, z: float, fraction: float,
               rounds: int) -> tuple[np.ndarray, float, float, int]:
    """(kept, median, threshold, k') of ``threshold_rule``."""
    n = len(X)
    kept = np.ones(n, bool)
    if n < MIN_ROWS:
        return kept, 0.0, np.inf, 0
    kk = cleaning_k(n, k, fraction)
    med = thr = 0.0
    for _ in range(rounds):
        s = np.log(np.maximum(kept_mean(X, kept, kk), 1e-12))
        ref = s[kept]
        med = float(np.median(ref))
        thr = min(ratio, z * 1.4826 * float(np.median(np.abs(ref - med))))
        new = s - med <= thr
        if np.array_equal(new, kept):
            break
        kept = new
    return kept, med, thr, kk


def threshold_rule(X: np.ndarray, k: int, *, ratio: float = RATIO, z: float = Z,
                   fraction: float = FRACTION, rounds: int = MAX_ROUNDS) -> np.ndarray:
    """s = log mean distance to the k' = cleaning_k nearest kept rows; drop the rows with
    s - median > min(ratio, z x 1.4826 MAD) (median and MAD of the kept rows); recompute
    against the rows kept and repeat until the kept set stops changing (at most ``rounds``
    times). Normal sets under MIN_ROWS rows are kept whole."""
    return _threshold(X, k, ratio, z, fraction, rounds)[0]


def product_auto(X: np.ndarray, k: int) -> np.ndarray:
    """dn2's default: ``dn2ops.index.cleaning.auto`` as a build runs it (the default
    IndexConfig sample; at least k + 1 rows kept, as a flat index needs)."""
    from dn2ops.config import IndexConfig
    from dn2ops.index import cleaning

    config = IndexConfig(k=k, clean_fraction="auto")
    return cleaning.auto(lambda: iter([X]), len(X), config, k + 1).kept


def default(X: np.ndarray, k: int) -> np.ndarray:
    """The research pass's rule in numpy, exact: ratio 0.25 or 3 MAD, whichever is smaller,
    k' = 5 % of n."""
    return threshold_rule(X, k)


def zscore(X: np.ndarray, k: int) -> np.ndarray:
    """(a) robust z only: drop log scores more than 3 MAD above the median (iterated)."""
    return threshold_rule(X, k, ratio=np.inf)


def ratio(X: np.ndarray, k: int) -> np.ndarray:
    """A neighbourhood more than e^0.25 = 1.28x the median row's (iterated)."""
    return threshold_rule(X, k, z=np.inf)


def large_k(X: np.ndarray, k: int) -> np.ndarray:
    """(b) the default rule with a neighbourhood of 10 % of n."""
    return threshold_rule(X, k, fraction=0.10)


def anchored(X: np.ndarray, k: int, *, ratio: float = RATIO, z: float = 2.5,
             fraction: float = 0.10, rounds: int = MAX_ROUNDS) -> np.ndarray:
    """More aggressive: the clean rows' median and SD estimated from the lower part of the
    log scores (5th and 25th percentiles, Gaussian), robust to a heavy right tail; drop
    s - median > min(ratio, z SD); k' = 10 % of n; iterated."""
    from scipy.stats import norm

    n = len(X)
    kept = np.ones(n, bool)
    if n < MIN_ROWS:
        return kept
    kk = cleaning_k(n, k, fraction)
    zlo, zmid = norm.ppf(0.05), norm.ppf(0.25)
    for _ in range(rounds):
        s = np.log(np.maximum(kept_mean(X, kept, kk), 1e-12))
        lo, mid = np.quantile(s, [0.05, 0.25])
        sd = (mid - lo) / (zmid - zlo)
        new = s - (mid - zmid * sd) <= min(ratio, z * sd)
        if np.array_equal(new, kept):
            break
        kept = new
    return kept


def fixed_share(share: float) -> Rule:
    """Reference, not a candidate: always drop the share of rows with the highest score."""
    def rule(X: np.ndarray, k: int) -> np.ndarray:
        n = len(X)
        s = kept_mean(X, np.ones(n, bool), cleaning_k(n, k))
        kept = np.ones(n, bool)
        kept[np.argsort(-s, kind="stable")[:round(share * n)]] = False
        return kept
    return rule


def mixture(X: np.ndarray, k: int) -> np.ndarray:
    """(a) two-component Gaussian mixture on the log scores (k' = 5 % of n): when BIC prefers
    two components and the upper one is the smaller, drop its rows (posterior > 0.5)."""
    from sklearn.mixture import GaussianMixture

    n = len(X)
    kept = np.ones(n, bool)
    if n < MIN_ROWS:
        return kept
    s = np.log(np.maximum(kept_mean(X, kept, cleaning_k(n, k)), 1e-12))[:, None]
    one = GaussianMixture(1, random_state=0).fit(s)
    two = GaussianMixture(2, random_state=0, n_init=3).fit(s)
    upper = int(np.argmax(two.means_[:, 0]))
    if two.bic(s) < one.bic(s) and two.weights_[upper] < 0.5:
        kept[two.predict_proba(s)[:, upper] > 0.5] = False
    return kept


def kmeans_clusters(X: np.ndarray, k: int, *, z: float = Z) -> np.ndarray:
    """(c) K-means with C = n / 100 clusters (2..100); a cluster's score: log mean distance
    of its centre to the k' = 5 % of n nearest rows OUTSIDE it; drop the clusters more than
    z MAD above the (row-weighted) median."""
    import faiss

    n = len(X)
    kept = np.ones(n, bool)
    if n < MIN_ROWS:
        return kept
    C = int(min(100, max(2, n // 100)))
    km = faiss.Kmeans(X.shape[1], C, niter=20, seed=1234, max_points_per_centroid=n)
    km.train(X)
    _, assign = km.index.search(X, 1)
    assign = assign[:, 0]
    cen = km.centroids
    G = np.sqrt(_sq_dists(cen, X, (X * X).sum(axis=1)))
    G[assign[None, :] == np.arange(C)[:, None]] = np.inf
    kk = min(cleaning_k(n, k), n - np.bincount(assign, minlength=C).max())
    score = np.log(np.sort(G, axis=1)[:, :kk].mean(axis=1))
    rows = score[assign]
    med = np.median(rows)
    mad = 1.4826 * np.median(np.abs(rows - med))
    return rows - med <= z * mad


def mutual_components(X: np.ndarray, k: int, *, m: int = 10, smallest: float = 0.01
                      ) -> np.ndarray:
    """(c) mutual m-NN graph; drop its connected components under 1 % of the rows."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(X)
    if n < MIN_ROWS:
        return np.ones(n, bool)
    _, I = neighbours(X, m)
    A = coo_matrix((np.ones(n * m), (np.repeat(np.arange(n), m), I[:, :m].ravel())),
                   shape=(n, n)).tocsr()
    _, label = connected_components(A.multiply(A.T), directed=False)
    return np.bincount(label)[label] >= smallest * n


def srr(X: np.ndarray, k: int, *, parts: int = 5, percentile: float = 95.0) -> np.ndarray:
    """(d) Yoon et al.'s data refinement with kNN one-class models: the rows split into
    disjoint parts (seeded); each part's model scores every row (mean distance to its
    max(k, 10) nearest rows of that part, itself excluded) and rejects rows above the
    given percentile of its own part's scores; a row is kept when no model rejects it."""
    n = len(X)
    kept = np.ones(n, bool)
    if n < MIN_ROWS:
        return kept
    part = np.random.default_rng(0).integers(0, parts, n)
    kk = max(k, MIN_K)
    for p in range(parts):
        member = part == p
        s = kept_mean(X, member, min(kk, int(member.sum()) - 1))
        kept &= s <= np.percentile(s[member], percentile)
    return kept


def sampled(X: np.ndarray, k: int, *, sample: int = SAMPLE, seed: int = 0) -> np.ndarray:
    """The default rule in its streaming form: decided (iterated) on ``sample`` random rows
    with k' = 5 % of the sample; then every row's mean distance to its k' nearest kept
    sample rows (itself excluded) is held against that median and threshold. One pass over
    the rows, each searched against at most ``sample`` rows."""
    n = len(X)
    if n <= sample:
        return default(X, k)
    rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    keep_s, med, thr, kk = _threshold(np.ascontiguousarray(X[rows]), k, RATIO, Z, FRACTION,
                                      MAX_ROUNDS)
    base = np.ascontiguousarray(X[rows[keep_s]])
    nb = (base * base).sum(axis=1)
    col = np.full(n, -1)  # column in ``base`` of each kept sample row
    col[rows[keep_s]] = np.arange(len(base))
    out = np.empty(n, bool)
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        G = _sq_dists(X[lo:hi], base, nb)
        own = col[lo:hi]
        mine = np.flatnonzero(own >= 0)
        G[mine, own[mine]] = np.inf
        near = np.sqrt(np.partition(G, kk - 1, axis=1)[:, :kk]).mean(axis=1)
        out[lo:hi] = np.log(np.maximum(near, 1e-12)) - med <= thr
    return out


RULES: dict[str, Rule] = {
    "auto": product_auto,
    "exact": default,
    "zscore": zscore,
    "ratio": ratio,
    "large-k": large_k,
    "anchored": anchored,
    "mixture": mixture,
    "kmeans": kmeans_clusters,
    "mutual": mutual_components,
    "srr": srr,
    "sampled": sampled,
    "fixed-30%": fixed_share(0.30),
}
FIXED = re.compile(r"fixed-(\d+(?:\.\d+)?)%")


def rule_named(name: str) -> Rule:
    """RULES[name], or fixed_share for any ``fixed-P%`` (e.g. fixed-15%)."""
    got = FIXED.fullmatch(name)
    return fixed_share(float(got.group(1)) / 100) if got else RULES[name]


HEAD = {"auto": "auto (default)", "true rate (k=200)": "true rate (fraction rule, k=200)"}
RULE_TEXT = {
    "auto": "dn2's default (dn2ops.index.cleaning.auto): min(0.25, 3 MAD) above the median "
            "of the log mean distance to 5 % of n kept rows, iterated; scored against a "
            "sample of 5,000 rows",
    "exact": "the same rule, this script's numpy, exact (no sample)",
    "zscore": "(a) 3 MAD only",
    "ratio": "0.25 (x1.28) only",
    "large-k": "(b) default with k' = 10 % of n",
    "anchored": "min(0.25, 2.5 SD), median/SD from the 5th-25th percentiles, k' = 10 % of n",
    "mixture": "(a) 2-component GMM on the log scores, BIC",
    "kmeans": "(c) K-means n/100 clusters, far clusters (3 MAD) dropped",
    "mutual": "(c) mutual 10-NN graph, components < 1 % dropped",
    "srr": "(d) SRR-style: 5 disjoint kNN models, each rejects > its 95th percentile",
    "sampled": f"exact decided on {SAMPLE} sampled rows, then one pass over all rows",
    "fixed-30%": "reference: always drop 30 % (highest mean distance to 5 % of n)",
}


# -- the run ---------------------------------------------------------------------------


def load(cache: str, dataset: str) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """(dataset, protocol, transformed train features, transformed test features)."""
    from benchmarks.accuracy import DATASETS, load_split, select
    from dn2ops import transforms
    from dn2ops.config import DEFAULT_BACKBONE

    ds = DATASETS[dataset]()
    prot = select(ds, None, None)
    split = load_split(cache, dataset, DEFAULT_BACKBONE)
    if split is None:
        raise FileNotFoundError(f"no {DEFAULT_BACKBONE} features of {dataset} under {cache}")
    return (ds, prot, transforms.apply(split.train, transforms.DEFAULT),
            transforms.apply(split.test, transforms.DEFAULT))


def impure_sets(train_labels: np.ndarray, train_idx: dict[int, np.ndarray], rate: float,
                seed: int) -> dict[int, tuple[np.ndarray, int]]:
    """{class: (normal-set indices, n good)}: the class's images, then the impurities."""
    rng = np.random.default_rng(seed)
    out = {}
    for c, idx in train_idx.items():
        others = np.flatnonzero(train_labels != c)
        bad = rng.choice(others, round(rate * len(idx) / (1 - rate)), replace=False)
        out[c] = (np.concatenate([idx, bad]), len(idx))
    return out


def best_share(per_class: dict[str, list[float]]) -> dict[str, Any]:
    """{name: AUC of each class} of the fixed shares (and none) -> the mean over the classes
    of each class's best AUC, and which share gave it: a choice only the test labels allow,
    so the most a rule removing rows by this score could reach."""
    names = list(per_class)
    a = np.array([per_class[n] for n in names])
    return {"auc": round(float(a.max(axis=0).mean()), 4), "of": names,
            "best": [names[i] for i in a.argmax(axis=0)]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.accuracy import DEEP, auc, kept_scores
    from dn2ops.index.knn import knn, set_faiss_threads

    set_faiss_threads(args.threads)
    ds, prot, Xtr, Xte = load(args.cache, args.dataset)
    labels = prot.test_labels
    Xte = Xte[prot.test_idx]
    res: dict[str, Any] = {"dataset": ds.name, "k": args.k, "seed": args.seed, "rows": []}
    for rate in args.rates:
        sets = impure_sets(ds.train_labels, prot.train_idx, rate, args.seed)
        rules: dict[str, Rule] = {"no cleaning": no_cleaning,
                                  "true rate (k=200)": true_rate(rate)}
        rules.update({name: rule_named(name) for name in args.rules})
        got: dict[str, list[tuple[float, float, float]]] = {name: [] for name in rules}
        agree: list[float] = []  # removed-set Jaccard of ``sampled`` and ``exact``
        seconds = dict.fromkeys(rules, 0.0)
        search = 0.0
        for c, (idx, n_good) in sets.items():
            X = np.ascontiguousarray(Xtr[idx])
            impure = np.arange(len(X)) >= n_good
            D, I = knn(Xte, X, min(DEEP, len(X)))
            if set(rules) & set(RULES) - {"auto"}:  # the lists the research rules read
                t0 = time.perf_counter()
                neighbours(X, min(len(X) - 1, max(400, round(0.25 * len(X)))))
                search += time.perf_counter() - t0
            masks = {}
            for name, rule in rules.items():
                t0 = time.perf_counter()
                kept = masks[name] = np.asarray(rule(X, args.k), bool)
                seconds[name] += time.perf_counter() - t0
                a = auc(labels, c, kept_scores(D, I, kept, X, Xte, args.k))
                bad = float((~kept & impure).sum() / impure.sum()) if impure.any() else np.nan
                good = float((~kept & ~impure).sum() / (~impure).sum())
                got[name].append((a, bad, good))
            if "sampled" in masks and "exact" in masks:
                both = (~masks["sampled"]) | (~masks["exact"])
                same = (~masks["sampled"]) & (~masks["exact"])
                agree.append(float(same.sum() / both.sum()) if both.any() else 1.0)
        row: dict[str, Any] = {"rate": rate, "search_seconds": round(search, 2)}
        for name, v in got.items():
            arr = np.array(v)
            row[name] = {"auc": round(float(arr[:, 0].mean()), 4),
                         "impurities_removed": None if np.isnan(arr[:, 1]).all()
                         else round(float(np.nanmean(arr[:, 1])), 3),
                         "good_removed": round(float(arr[:, 2].mean()), 4),
                         "good_removed_max": round(float(arr[:, 2].max()), 4),
                         "per_class_auc": [round(float(a), 4) for a in arr[:, 0]],
                         "seconds": round(seconds[name], 2)}
        if agree:
            row["sampled_default_jaccard"] = round(float(np.mean(agree)), 3)
        fixed = [name for name in rules if FIXED.fullmatch(name)]
        if fixed:  # the ceiling of removing rows by this score, with the labels' help
            row["oracle"] = best_share({"none": [a for a, _, _ in got["no cleaning"]],
                                        **{f: [a for a, _, _ in got[f]] for f in fixed}})
        res["rows"].append(row)
        LOG.info("rate %.2f: %s", rate, {n: row[n]["auc"] for n in rules})
    return res


def time_pass(n: int, d: int = 2560, sample: int = SAMPLE, seed: int = 0) -> dict[str, Any]:
    """Seconds of ``sampled``'s two steps on n synthetic unit rows of d dimensions (a seeded
    mixture of 20 Gaussian clusters): deciding on ``sample`` rows, and the pass of every
    row against them (linear in n)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d)).astype(np.float32)
    X = centres[rng.integers(0, 20, n)] + rng.standard_normal((n, d), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rows = np.sort(rng.choice(n, sample, replace=False))
    t0 = time.perf_counter()
    keep_s, med, thr, kk = _threshold(np.ascontiguousarray(X[rows]), 2, RATIO, Z, FRACTION,
                                      MAX_ROUNDS)
    t1 = time.perf_counter()
    sampled(X, 2, sample=sample)  # decides again (same sample), then the pass
    t2 = time.perf_counter()
    return {"rows": n, "d": d, "sample": sample, "decide_seconds": round(t1 - t0, 2),
            "pass_seconds": round(t2 - t1 - (t1 - t0), 2),
            "pass_us_per_row": round(1e6 * (t2 - t1 - (t1 - t0)) / n, 1)}


def render(res: dict[str, Any]) -> str:
    rows = res["rows"]
    names = [key for key in rows[0]
             if key not in ("rate", "search_seconds", "sampled_default_jaccard", "oracle")]
    head = ["rate", "no cleaning",
            *(f"{HEAD.get(n, n)}: AUC / imp. / good (max)" for n in names[1:])]

    def cell(r: dict[str, Any], name: str) -> str:
        v = r[name]
        if name == "no cleaning":
            return f"{v['auc']:.4f}"
        imp = "-" if v["impurities_removed"] is None else f"{v['impurities_removed']:.0%}"
        good = f"{v['good_removed']:.1%} ({v['good_removed_max']:.1%})"
        return f"{v['auc']:.4f} / {imp} / {good}"

    lines = [f"## {res['dataset']}: cleaning rules (DN2 k={res['k']}, impurity seed "
             f"{res['seed']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([f"{r['rate']:.0%}", *(cell(r, n) for n in names)]) + " |"
              for r in rows]
    lines += ["", "AUC: mean ROC-AUC over the classes; imp.: share of the impurities removed; "
              "good: share of the normal-class images removed, mean over the classes (the "
              "largest one class lost in brackets).", "",
              "Seconds of each rule, all classes (the research rules' shared exact "
              "leave-one-out search of 25 % of n neighbours, 400 at least, is its own row):", "",
              "| rule | " + " | ".join(f"{r['rate']:.0%}" for r in rows) + " |",
              "|" + "---|" * (len(rows) + 1)]
    if any(r["search_seconds"] for r in rows):
        lines += ["| shared neighbour search (research rules) | "
                  + " | ".join(f"{r['search_seconds']:.1f}" for r in rows) + " |"]
    lines += ["| " + " | ".join([n, *(f"{r[n]['seconds']:.1f}" for r in rows)]) + " |"
              for n in names[1:]]
    lines += [""]
    if "sampled_default_jaccard" in rows[0]:
        lines += ["Rows removed by `sampled` and by `exact`, |both| / |either| (mean over "
                  "the classes): " + ", ".join(f"{r['rate']:.0%}: "
                                               f"{r['sampled_default_jaccard']:.2f}"
                                               for r in rows), ""]
    if "oracle" in rows[0]:
        lines += ["Best of the fixed shares for each class, chosen with the test labels (the "
                  "most any rule that removes rows by this score could give; no rule can "
                  "choose so without the labels): " + ", ".join(
                      f"{r['rate']:.0%}: {r['oracle']['auc']:.4f}" for r in rows)
                  + f" (of {', '.join(rows[0]['oracle']['of'])})", ""]
    lines += [f"- {n}: {RULE_TEXT[n]}" for n in names if n in RULE_TEXT]
    lines += [f"- {n}: reference: always drop {FIXED.fullmatch(n).group(1)} % (highest mean "
              "distance to 5 % of n)" for n in names
              if FIXED.fullmatch(n) and n not in RULE_TEXT]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from benchmarks.accuracy import DEFAULT_CACHE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("fmnist", "digits"), default="fmnist")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--rates", default="0,0.01,0.05,0.1,0.2")
    p.add_argument("--rules", default="auto",
                   help=f"comma-separated, of {','.join(RULES).replace('%', '%%')} "
                        "(fixed-P%%: any share P)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the impurity draw")
    p.add_argument("--threads", type=int, default=2, help="faiss threads")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--scale", type=int, default=None,
                   help="only time the streaming form on this many synthetic rows")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.rules = [r for r in args.rules.split(",") if r]
    unknown = {r for r in args.rules if r not in RULES and not FIXED.fullmatch(r)}
    if unknown:
        p.error(f"unknown rules {sorted(unknown)}; choose from {sorted(RULES)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if args.scale:
        got = time_pass(args.scale)
        print(json.dumps(got))
        return got
    res = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    print(render(res))
    return res


if __name__ == "__main__":
    main()
