"""Research leads for issue 27, not dn2's behaviour: score against a cleaned normal set
with each neighbour's distance floored by its own typicality, or with a mass-scale check.

What survives cleaning on a contaminated normal set is the impurities closest to the
normal class, a few of each foreign class; a test anomaly of that class then finds two
of them as its k = 2 nearest "normal" neighbours and scores low. Here a kept training
row j vouches for a test image x only down to a share ``a`` of its own typicality r_j,
the mean distance from j to its m nearest other kept rows (the neighbourhood the auto
cleaning scores rows by: m = 5 % of n):

    score(x) = mean over x's k nearest kept rows j of max(d(x, j), a * r_j)

A bulk normal row has a small r_j (its m neighbours are its own kind), so a normal test
image near it scores as before; a surviving impurity has few of its own kind among its
m nearest, a large r_j, and no longer makes its class's test images look normal.

Protocol: benchmarks/contamination.py's (the full protocol, dn2's default features and
transform, impurities drawn as there), the normal set cleaned by the product's auto rule
(``product_auto``), then every test image scored against the kept rows, plainly (``plain``,
dn2's score) and floored, for each m and a; mean ROC-AUC over the classes per rate.

    python benchmarks/contamination_scoring.py --dataset fmnist --cache CACHE \\
        [--rates 0,0.05,0.1] [--m 5%,100,300] [--a 0.85,0.9,1.0]

A second lead, the mass-scale check (``--mass``): a surviving impurity has kin, so a
test anomaly of its class scores low at k = 2, but its kind holds too few rows to fill a
neighbourhood of K = a share of n (1 or 2 %), so the K-th nearest distance stays large.
Each test image gets two empirical p-values, of its k = 2 score among the kept rows' own
leave-one-out k = 2 scores (p2) and of its K-th distance among theirs (pK), and

    score(x) = max(p2, clip((pK - tau) / (1 - tau), 0, 1))     ("mass K, tau")

(ties broken by the k = 2 score); tau = 0 is the plain maximum, a larger tau lets only
the far tail of pK count. Also the K-th distance alone ("kth K").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
    sys.path.insert(0, REPO)


def floored_scores(D: np.ndarray, I: np.ndarray, r: np.ndarray, a: float) -> np.ndarray:
    """(m,) mean over each row's neighbours of max(distance, a * the neighbour's r).
    D, I: (m, k) distances to and indices of the k nearest kept rows; r: (n_kept,)."""
    return np.maximum(D, a * r[I]).mean(axis=1, dtype=np.float64)


def typicality(Dl: np.ndarray, m: int) -> np.ndarray:
    """r (n,): each row's mean distance to its m nearest other rows (Dl: leave-one-out
    distances, ascending, at least m columns)."""
    return Dl[:, :m].mean(axis=1, dtype=np.float64)


def empirical_p(reference: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Share of ``reference`` at or below each x (the right-continuous empirical CDF)."""
    return np.searchsorted(np.sort(reference), x, side="right") / len(reference)


def mass_scores(d2: np.ndarray, dK: np.ndarray, l2: np.ndarray, lK: np.ndarray,
                tau: float) -> np.ndarray:
    """max(p2, clip((pK - tau) / (1 - tau), 0, 1)) for test rows whose k = 2 score is d2
    and K-th nearest distance dK, against the kept rows' own leave-one-out l2 and lK; ties
    broken by d2 (a term below any step of the p-values)."""
    p2, pK = empirical_p(l2, d2), empirical_p(lK, dK)
    p = np.maximum(p2, np.clip((pK - tau) / (1.0 - tau), 0.0, 1.0))
    top = float(np.max(d2)) or 1.0
    return p + 1e-9 * d2 / top


def neighbourhood(spec: str, n: int) -> int:
    """'5%' -> 5 % of n (at least 10, as the auto cleaning's k_c); '100' -> 100; at most
    n - 1."""
    m = max(10, round(float(spec[:-1]) / 100 * n)) if spec.endswith("%") else int(spec)
    return min(n - 1, m)


def run(dataset: str, cache: str, rates: Sequence[float], ms: Sequence[str],
        alphas: Sequence[float], k: int = 2, seed: int = 0, masses: Sequence[str] = (),
        taus: Sequence[float] = (0.0,)) -> dict[str, dict[str, float]]:
    from benchmarks.accuracy import auc
    from benchmarks.contamination import impure_sets, load, product_auto
    from dn2ops.index.knn import knn, knn_leave_one_out

    ds, prot, Xtr, Xte = load(cache, dataset)
    labels = prot.test_labels
    Xte = np.ascontiguousarray(Xte[prot.test_idx])
    out: dict[str, dict[str, float]] = {}
    for rate in rates:
        got: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for c, (idx, _) in impure_sets(ds.train_labels, prot.train_idx, rate, seed).items():
            X = np.ascontiguousarray(Xtr[idx])
            K = np.ascontiguousarray(X[product_auto(X, k)])
            sizes = {spec: neighbourhood(spec, len(K)) for spec in ms}
            big = {spec: max(k, neighbourhood(spec, len(K))) for spec in masses}
            D, I = knn(Xte, K, max(k, *big.values()))
            d2 = D[:, :k].mean(axis=1, dtype=np.float64)
            got.setdefault("plain", []).append(auc(labels, c, d2))
            Dl, _ = knn_leave_one_out(K, max(k, *sizes.values(), *big.values()))
            l2 = Dl[:, :k].mean(axis=1, dtype=np.float64)
            for spec, K_ in big.items():
                dK, lK = D[:, K_ - 1].astype(np.float64), Dl[:, K_ - 1].astype(np.float64)
                got.setdefault(f"kth {spec}", []).append(auc(labels, c, dK))
                for tau in taus:
                    got.setdefault(f"mass {spec}, tau={tau:g}", []).append(
                        auc(labels, c, mass_scores(d2, dK, l2, lK, tau)))
            D, I = D[:, :k], I[:, :k]
            for spec, m in sizes.items():
                r = typicality(Dl, m)
                for a in alphas:
                    got.setdefault(f"m={spec}, a={a:g}", []).append(
                        auc(labels, c, floored_scores(D, I, r, a)))
        out[f"{rate:g}"] = {name: round(float(np.mean(v)), 4) for name, v in got.items()}
        print(f"rate {rate:g}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def render(out: dict[str, dict[str, float]]) -> str:
    from benchmarks.markdown import table

    rates = list(out)
    names = list(out[rates[0]])
    return table(["score", *(f"{float(r):.0%} impurities" for r in rates)],
                 [[n, *(f"{out[r][n]:.4f}" for r in rates)] for n in names])


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    from benchmarks.accuracy import DEFAULT_CACHE
    from dn2ops.index.knn import set_faiss_threads

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("fmnist", "digits"), default="fmnist")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--rates", default="0,0.05,0.1")
    p.add_argument("--m", default="5%,100,300", help="typicality neighbourhoods")
    p.add_argument("--a", default="0.85,0.9,1.0", help="shares of the typicality")
    p.add_argument("--mass", default="", help="mass-scale neighbourhoods K, e.g. 1%%,2%%")
    p.add_argument("--tau", default="0", help="mass-scale p-value tails, e.g. 0,0.5")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    set_faiss_threads(args.threads)
    out = run(args.dataset, args.cache, [float(x) for x in args.rates.split(",")],
              [m for m in args.m.split(",") if m], [float(x) for x in args.a.split(",") if x],
              masses=[m for m in args.mass.split(",") if m],
              taus=[float(x) for x in args.tau.split(",")])
    print(json.dumps(out))
    print(render(out))
    return out


if __name__ == "__main__":
    main()
