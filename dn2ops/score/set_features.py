"""A set's features: pooled to one vector, or scored by their spread (covtrace).

A group is a set of m images described by their features (m, d).  It is either
pooled to one (d,) vector, which is then scored with kNN like a single image,
or scored directly by the spread of its features (`SetSummary.covtrace`: the trace
of their covariance).

`pool_set` takes the whole (m, d) array (a few normal sets, in memory); `SetSummary`
summarises some members at a time and merges partial summaries, so a pipeline never
holds a set's features (O(d) a set, whatever m is).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dn2ops.index.knn import as_float32

__all__ = ["SetSummary", "pool_set"]

PoolHow = Literal["mean", "max"]


def pool_set(features: np.ndarray, how: PoolHow = "mean") -> np.ndarray:
    """Pool a set's features (m, d), m >= 1, into one float32 vector (d,).

    ``how="mean"`` averages over the set (accumulated in float64), ``"max"``
    takes the per-dimension maximum.  float32 so it can go straight to
    `dn2ops.index.knn`.
    """
    x = as_float32(features, name="features")
    if x.shape[0] < 1:
        raise ValueError("cannot pool an empty set: features has 0 rows")
    if how == "mean":
        return x.mean(axis=0, dtype=np.float64).astype(np.float32)
    if how == "max":
        return x.max(axis=0)
    raise ValueError(f"how must be 'mean' or 'max', got {how!r}")


class SetSummary:
    """What a set's score needs, from some of its features at a time: `of` some members,
    `merge` two summaries of the same set.

    ``pool`` ("mean" or "max") keeps what `pool_set` needs, ``covtrace=True`` what
    `covtrace` needs: the count, the mean (float64) and the sum over all dimensions of
    the squared deviations from it, computed per batch of members and merged pairwise
    (Chan et al.), so no whole set and no per-dimension sum of squares (which cancels
    badly) is ever formed. Results equal the whole-array computations up to float64
    rounding (the order of the additions differs), not bitwise.
    """

    __slots__ = ("count", "mean", "m2", "max")

    def __init__(self, pool: PoolHow | None = None, covtrace: bool = False):
        if pool not in (None, "mean", "max"):
            raise ValueError(f"pool must be 'mean', 'max' or None, got {pool!r}")
        self.count = 0
        self.mean: np.ndarray | None = np.zeros(0) if covtrace or pool == "mean" else None
        self.m2 = 0.0 if covtrace else None
        self.max: np.ndarray | None = np.zeros(0, np.float32) if pool == "max" else None

    @classmethod
    def of(cls, features: np.ndarray, pool: PoolHow | None = None,
           covtrace: bool = False) -> SetSummary:
        """The summary of some members at once (m, d), m >= 1: their count, float64 mean,
        squared deviations from it and max, computed with numpy."""
        x = np.asarray(features, np.float32)
        if x.ndim != 2 or not len(x):
            raise ValueError(f"members must be a non-empty (m, d) array, got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("a set member's feature has NaN or inf values")
        s = cls(pool, covtrace)
        s.count = len(x)
        if s.max is not None:
            s.max = x.max(axis=0)
        if s.mean is not None:
            x64 = x.astype(np.float64)
            s.mean = x64.mean(axis=0)
            if s.m2 is not None:
                s.m2 = float(((x64 - s.mean) ** 2).sum(axis=0).sum())  # as np.var
        return s

    def merge(self, other: SetSummary) -> SetSummary:
        """Folds another summary (of other members of the same set) into this one."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2, self.max = (
                other.count, other.mean.copy() if other.mean is not None else None,
                other.m2, other.max.copy() if other.max is not None else None)
            return self
        n = self.count + other.count
        if self.max is not None:
            np.maximum(self.max, other.max, out=self.max)
        if self.mean is not None:
            delta = other.mean - self.mean
            if self.m2 is not None:
                self.m2 += other.m2 + float(delta @ delta) * self.count * other.count / n
            self.mean += delta * (other.count / n)
        self.count = n
        return self

    def pooled(self, how: PoolHow) -> np.ndarray:
        """The set's pooled float32 vector (d,), as `pool_set` gives it."""
        if self.count == 0:
            raise ValueError("cannot pool an empty set: no member added")
        got = self.mean if how == "mean" else self.max if how == "max" else None
        if got is None:
            raise ValueError(f"this summary does not keep what --pool {how} needs")
        return got.astype(np.float32)

    def covtrace(self) -> float:
        """Trace of the covariance of the set's features (m, d), m >= 2: the sum over
        dimensions of the per-dimension sample variance (ddof=1, the unbiased estimator,
        so sets of different sizes are comparable), without forming the (d, d) matrix.
        Higher = more spread out = more anomalous for sets that should be homogeneous."""
        if self.m2 is None:
            raise ValueError("this summary does not keep what covtrace needs")
        if self.count < 2:
            raise ValueError(f"covtrace needs at least 2 set members, got m={self.count}")
        return max(self.m2, 0.0) / (self.count - 1)

    def __getstate__(self):
        return self.count, self.mean, self.m2, self.max

    def __setstate__(self, state):
        self.count, self.mean, self.m2, self.max = state

    def __repr__(self) -> str:
        d = next((len(a) for a in (self.mean, self.max) if a is not None), 0)
        return f"SetSummary(count={self.count}, d={d})"
