"""A set's features: pooled to one vector, or scored by their spread (covtrace).

A group is a set of m images described by their features (m, d).  It is either
pooled to one (d,) vector, which is then scored with kNN like a single image,
or scored directly by the spread of its features (`covtrace_score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from dn2ops.knn import as_float32

__all__ = ["covtrace_score", "pool_set", "pool_sets"]

PoolHow = Literal["mean", "max"]


def pool_set(features: np.ndarray, how: PoolHow = "mean") -> np.ndarray:
    """Pool a set's features (m, d), m >= 1, into one float32 vector (d,).

    ``how="mean"`` averages over the set (accumulated in float64), ``"max"``
    takes the per-dimension maximum.  float32 so it can go straight to
    `dn2ops.knn`.
    """
    x = as_float32(features, name="features")
    if x.shape[0] < 1:
        raise ValueError("cannot pool an empty set: features has 0 rows")
    if how == "mean":
        return x.mean(axis=0, dtype=np.float64).astype(np.float32)
    if how == "max":
        return x.max(axis=0)
    raise ValueError(f"how must be 'mean' or 'max', got {how!r}")


def pool_sets(sets: Sequence[np.ndarray], how: PoolHow = "mean") -> np.ndarray:
    """Pool each set (m_i, d) of ``sets`` with `pool_set`; returns float32 (n_sets, d).

    Sets may have different sizes m_i but must share d.
    """
    if len(sets) == 0:
        raise ValueError("sets is empty: need at least one set to pool")
    pooled = [pool_set(s, how) for s in sets]
    dims = {p.shape[0] for p in pooled}
    if len(dims) != 1:
        raise ValueError(
            f"all sets must have the same number of features, got {sorted(dims)}"
        )
    return np.stack(pooled)


def covtrace_score(features: np.ndarray) -> float:
    """Trace of the covariance of a set's features (m, d), m >= 2.

    Equals the sum over dimensions of the per-dimension sample variance
    (ddof=1, the unbiased estimator, so sets of different sizes are
    comparable), computed in float64 without forming the (d, d) matrix.
    Higher = more spread out = more anomalous for sets that should be
    homogeneous.  Raises ValueError if m < 2 (variance undefined).
    """
    x = as_float32(features, name="features")
    if x.shape[0] < 2:
        raise ValueError(
            f"covtrace_score needs at least 2 set members, got m={x.shape[0]}"
        )
    return float(x.astype(np.float64).var(axis=0, ddof=1).sum())
