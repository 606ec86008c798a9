"""Calibrated p-values of DN2 scores against an index's normal reference (issue 28).

The reference is a uniform sample of the normal images with their own scores: each
image's mean distance to its k nearest normal images kept in the index, itself left
out (normal.parquet's ``loo_score``; images removed by cleaning are scored against the
kept ones, as a new image would be; K-means scores out of the centres' training sample;
dn2ops.index.build). A new score s (higher = more anomalous) gets the conformal p-value

    p = (1 + #{reference >= s}) / (n + 1)                                 source "rank"

small = anomalous: for a new normal image exchangeable with the reference,
P(p <= alpha) <= alpha for every alpha. Where fewer than ``tail.switch`` reference
scores reach s (below the rank's resolution 1 / (n + 1)), a generalised Pareto tail
fitted to the reference's top ``n_exceed`` scores (peaks over threshold u) extrapolates:

    p = (1 + n_exceed) / (n + 1) * GPD.sf(s - u)                          source "tail"

capped at (1 + switch) / (n + 1), so p never rises with the score. The tail is fitted
when the index is built (manifest ``reference.tail``); an index built before it is
fitted when loaded. Measured in benchmarks/calibration.py.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import genpareto

from dn2ops.index.files import KIND, IndexDir, IndexError_
from dn2ops.io import outputs

MIN_EXCEED = 20  # fewer exceedances than this: no tail (rank p-values only)


@dataclasses.dataclass(frozen=True)
class Tail:
    """Generalised Pareto fit of a reference's upper tail (peaks over threshold).

    n: reference scores; n_exceed: scores above ``threshold`` (the (n_exceed + 1)-th
    largest) to which the GPD(shape, scale) of the excesses was fitted; ``switch``: the
    tail gives p where fewer than ``switch`` reference scores are >= the score."""

    n: int
    n_exceed: int
    threshold: float
    shape: float
    scale: float
    switch: int


def default_exceedances(n: int) -> int:
    """Exceedances for the tail fit of n reference scores: 5% of them, 50 to 500
    (never more than n // 2)."""
    return int(min(max(round(0.05 * n), 50), 500, n // 2))


def fit_tail(reference: np.ndarray, n_exceed: int | None = None, *, switch: int = 10,
             min_shape: float | None = 0.0) -> Tail | None:
    """GPD fit (maximum likelihood, location 0) to the excesses of the ``n_exceed`` largest
    reference scores (n,) over the next one; None when there would be fewer than
    MIN_EXCEED (or no excess above the threshold). NaN scores are ignored.

    ``min_shape``: a fitted shape below it is replaced by the constrained fit at it (0:
    the exponential tail, scale = mean excess): a bounded fitted tail would give p = 0
    beyond its end point. None: the free fit."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    ref = ref[np.isfinite(ref)]
    n = len(ref)
    n_exceed = default_exceedances(n) if n_exceed is None else min(int(n_exceed), n - 1)
    if n_exceed < MIN_EXCEED:
        return None
    u = float(ref[n - n_exceed - 1])
    excess = ref[n - n_exceed:] - u
    if not np.any(excess > 0):
        return None
    shape, _, scale = genpareto.fit(excess, floc=0)
    if min_shape is not None and shape < min_shape:
        shape = float(min_shape)
        if shape == 0.0:
            scale = float(excess.mean())
        else:
            scale = float(genpareto.fit(excess, f0=shape, floc=0)[2])
    return Tail(n, int(n_exceed), u, float(shape), float(scale), int(min(switch, n_exceed)))


def p_values(scores: np.ndarray, reference_sorted: np.ndarray, tail: Tail | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(p (m,) float64, tail_used (m,) bool) of scores (m,) against a reference (n,) sorted
    ascending: the rank p-value (1 + #{reference >= s}) / (n + 1), or the tail's where
    fewer than ``tail.switch`` reference scores reach the score. Small p = anomalous."""
    s = np.asarray(scores, dtype=np.float64)
    n = len(reference_sorted)
    count = n - np.searchsorted(reference_sorted, s, side="left")  # reference >= score
    p = (1.0 + count) / (n + 1.0)
    if tail is None:
        return p, np.zeros(len(s), bool)
    use = count < tail.switch
    if use.any():
        sf = genpareto.sf(s[use] - tail.threshold, tail.shape, scale=tail.scale)
        p[use] = np.minimum((1.0 + tail.n_exceed) / (n + 1.0) * sf,
                            (1.0 + tail.switch) / (n + 1.0))
    return p, use


def source_names(tail_used: np.ndarray) -> np.ndarray:
    """The ``p_value_source`` column (m,): 'tail' where the tail gave p, else 'rank'."""
    return np.where(tail_used, "tail", "rank")


def rank_floor(n: int) -> float:
    """The smallest rank p-value of a reference of n scores: 1 / (n + 1)."""
    return 1.0 / (n + 1.0)


def tail_of(entry: dict[str, Any] | None) -> Tail | None:
    """The Tail a manifest's ``reference.tail`` records (None: none was fitted)."""
    return None if entry is None else Tail(**entry)


def tail_entry(tail: Tail | None) -> dict[str, Any] | None:
    """A Tail as the manifest's ``reference.tail`` records it (JSON; None: no tail)."""
    return None if tail is None else dataclasses.asdict(tail)


@dataclasses.dataclass(frozen=True)
class Reference:
    """An index's normal reference: ``scores`` (n,) float64 ascending and its ``tail``
    (None when the reference is too small for one).

    ``p_values(scores)``: small = anomalous, P(p <= alpha) <= alpha for a new normal
    image under exchangeability; ``percentile(scores)``: % of the reference strictly
    below; both from the same scores, so they agree."""

    scores: np.ndarray
    tail: Tail | None

    @classmethod
    def of(cls, scores: np.ndarray, tail: Tail | None | str = "fit") -> Reference:
        """The reference of scores (n,) (NaN ignored); ``tail`` 'fit': fitted here."""
        s = np.sort(np.asarray(scores, dtype=np.float64))
        s = s[np.isfinite(s)]
        return cls(s, fit_tail(s) if tail == "fit" else tail)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def floor(self) -> float:
        """The smallest p a score can get: 1 / (n + 1) with rank p-values only; 0.0 with
        a tail (it extrapolates without bound)."""
        return rank_floor(self.n) if self.tail is None else 0.0

    def p_values(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p (m,) float64, source (m,) 'rank' | 'tail') of scores (m,)."""
        p, used = p_values(scores, self.scores, self.tail)
        return p, source_names(used)

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """% (0..100) (m,) of the reference scores strictly below each score."""
        if not self.n:
            return np.full(len(np.asarray(scores)), np.nan)
        return 100.0 * np.searchsorted(self.scores, scores, side="left") / self.n


def reference_of(manifest: dict[str, Any], normal: pa.Table) -> Reference:
    """The reference of an index: its manifest and its normal.parquet table. The rows
    with a ``loo_score`` form it: kept and removed ones when the manifest's reference
    ``includes_removed``, else (an index built before removed rows were scored) the kept
    ones. The tail is the manifest's, or fitted here for an index that predates it."""
    loo = normal.column("loo_score").to_numpy(zero_copy_only=False)
    entry = manifest.get("reference") or {}
    if not entry.get("includes_removed"):
        loo = loo[normal.column("kept").to_numpy(zero_copy_only=False)]
    return Reference.of(loo, tail_of(entry["tail"]) if "tail" in entry else "fit")


def read_normal(files: IndexDir) -> pa.Table:
    """An index's normal.parquet, its sha256 checked (when ``files.verify``)."""
    try:
        return pq.read_table(io.BytesIO(files.read("normal.parquet")))
    except pa.ArrowException as e:  # checksum recomputed over a damaged file
        raise IndexError_(f"index file normal.parquet is corrupt or truncated: {e}; "
                          "rebuild the index") from None


def load_reference(index_dir: str, *, verify: bool = True) -> Reference:
    """The reference of a committed index, from its manifest and normal.parquet only (not
    its shards): what scoring needs to turn scores into p-values."""
    manifest = outputs.require_complete(index_dir, KIND)
    return reference_of(manifest, read_normal(IndexDir(index_dir, manifest, verify=verify)))
