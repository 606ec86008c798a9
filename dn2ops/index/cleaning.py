"""Cleaning the normal set: which normal rows an index leaves out, and why.

A normal set often holds images that are not normal (mislabelled, broken, another
product): left in, they become the nearest "normal" neighbours of the anomalies that look
like them, and hide them. One rule is chosen once from the IndexConfig (`rule_of`):

* ``off`` (``clean_fraction`` 0, ``--no-clean``): every row is kept.
* ``fraction`` (``--clean-fraction F``): the round(F n) rows with the highest leave-one-out
  score over ``clean_k`` neighbours go (`by_fraction`; exact, n^2 d: every row against
  every row). The rate must be known.
* ``auto`` (the command line's default; `auto`): no rate. Each row's cleaning score is
  s = log(mean distance to its k_c nearest other kept rows), k_c = 5 % of n (at least 10,
  no upper cap): a neighbourhood larger than the small clusters impurities form, so a
  cluster of them cannot vouch for itself. Rows with s - median > min(3 x 1.4826 MAD,
  0.25) go (median and MAD over the kept rows; 0.25 in log units is a neighbourhood 1.28x
  as wide as the median row's, the cap that matters when impurities inflate the MAD), and
  the scores are computed again against the rows kept, until the kept set stops changing
  (at most 20 rounds). Below 50 rows nothing is removed; never more than half of the rows
  go, and at least what the index kind needs stays. The share removed is the estimated
  contamination rate. (config: CLEAN_AUTO_*.)

The auto rule stays linear in n: rows are scored against a uniform sample of m rows
(``clean_sample``, 5,000), with k_s = round(k_c m / n) neighbours, i.e. 5 % of the sample
(the k_s-th nearest of a uniform sample of m is about the k_c-th nearest of all n). The
rounds run on the sample alone (its rows' own leave-one-out scores within the sample give
the median and MAD); then one pass scores every row against the kept part of the sample
and applies the last round's threshold. Two reads of the features (gather the sample,
score every row) and n m d work; with m = n it is the exact rule.

Every rule returns `Cleaned`: the kept mask, each row's cleaning score (normal.parquet's
``clean_score``) and the manifest's ``cleaning`` entry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np

from dn2ops.config import (
    CLEAN_AUTO_MIN_K,
    CLEAN_AUTO_MIN_ROWS,
    CLEAN_AUTO_RATIO,
    CLEAN_AUTO_ROUNDS,
    CLEAN_AUTO_SHARE,
    CLEAN_AUTO_Z,
    IndexConfig,
    cleaning_k,
)
from dn2ops.index import streams
from dn2ops.index.reference import flat_loo, reference_scores
from dn2ops.index.shards import shard_loader, shard_sizes, write_flat_shards
from dn2ops.io import outputs
from dn2ops.io import progress as progress_log

LOG = logging.getLogger("dn2")

Rows = Callable[..., Iterator[np.ndarray]]
# MAD -> standard deviation for a normal distribution; mean absolute deviation likewise
# (the fallback when more than half the scores are equal, so the MAD is 0).
MAD_SCALE = 1.4826
MEAN_AD_SCALE = 1.2533
# Query rows searched at once against the sample.
_QUERY_BLOCK = 8192


@dataclasses.dataclass
class Cleaned:
    """What a cleaning rule decided for n normal rows: ``kept`` (n,) bool, ``scores``
    (n,) float64 each row's cleaning score (higher = more suspicious; NaN where none was
    computed) and ``entry``, the manifest's ``cleaning`` record. ``removed_rows``: {id:
    row (d,)} for rows of the ``gather`` ids `clean` was given, copied during the rule's
    own passes so that no pass is made again for them: every such id the rule removed is
    there (others may be); None when the rule gathered nothing."""

    kept: np.ndarray
    scores: np.ndarray
    entry: dict[str, Any]
    removed_rows: dict[int, np.ndarray] | None = None

    def rows_removed(self, ids: np.ndarray) -> np.ndarray | None:
        """The rows (len(ids), d) of the removed ``ids`` if they were all gathered."""
        got = self.removed_rows
        if got is None or not all(int(i) in got for i in ids):
            return None
        return np.stack([got[int(i)] for i in ids]) if len(ids) else None


def rule_of(config: IndexConfig) -> str:
    """'off', 'fraction' or 'auto': the rule ``config`` asks for."""
    return config.clean_rule


def clean(rows: Rows, per_shard: list[int], config: IndexConfig, min_keep: int, *,
          fs, stage: str, device: str, gather: np.ndarray | None = None) -> Cleaned:
    """The rule of ``config`` applied to the normal rows ``rows()`` yields (transformed,
    ``per_shard`` rows per feature shard), leaving at least ``min_keep``. ``gather``:
    sorted ids whose rows, if removed, are wanted after (the build's reference sample:
    Cleaned.removed_rows)."""
    n = int(sum(per_shard))
    rule = rule_of(config)
    if rule == "fraction":
        return by_fraction(rows, per_shard, config, min_keep, fs=fs, stage=stage,
                           device=device)
    if rule == "auto":
        return auto(rows, n, config, min_keep, gather=gather)
    return off(n)


def off(n: int, why: str | None = None) -> Cleaned:
    """Nothing removed, no score computed (``why``: the auto rule was asked but not applied)."""
    entry = _entry("off" if why is None else "not applied", n, np.ones(n, bool), None)
    if why is not None:
        entry.update(asked="auto", why=why)
    return Cleaned(np.ones(n, bool), np.full(n, np.nan), entry)


def _entry(rule: str, n: int, kept: np.ndarray, threshold: float | None, *,
           sample: int | None = None, rounds: int = 0) -> dict[str, Any]:
    removed = int(n - kept.sum())
    return {"rule": rule, "estimated_rate": round(removed / n, 6) if rule == "auto" else None,
            "removed": removed, "of": n, "threshold": threshold, "sample": sample,
            "rounds": rounds}


# -- the fraction rule ----------------------------------------------------------------


def by_fraction(rows: Rows, per_shard: list[int], config: IndexConfig, min_keep: int, *,
                fs, stage: str, device: str) -> Cleaned:
    """--clean-fraction F: every row's exact leave-one-out score (n,) over cleaning_k
    neighbours (provisional flat shards of all rows in ``stage``/_clean, removed after),
    as DN2Scorer; the round(F n) highest go (ties: the lower row first), leaving at
    least ``min_keep``."""
    n = int(sum(per_shard))
    c = config
    clean_k = cleaning_k(c.k, c.clean_k, n)
    n_drop = min(round(float(c.clean_fraction) * n), n - min_keep)
    kept, loo = np.ones(n, bool), np.full(n, np.nan)
    if n_drop > 0:
        tmp = outputs.join(stage, "_clean")
        tmp_names = list(write_flat_shards(fs, tmp, rows(), shard_sizes(n, c.shards,
                                                                         per_shard)))
        loo = reference_scores(
            flat_loo(shard_loader(fs, tmp, tmp_names, device), clean_k, device), rows, n, None,
            progress=progress_log.Progress(
                n, "--clean-fraction: leave-one-out scores of every normal image"))
        fs.rm(tmp, recursive=True)
        kept[np.argsort(-loo, kind="stable")[:n_drop]] = False
    threshold = float(loo[~kept].min()) if n_drop > 0 else None
    entry = {**_entry("fraction", n, kept, threshold, rounds=1),
             "fraction": float(c.clean_fraction), "clean_k": clean_k}
    entry["estimated_rate"] = None  # the rate was given, not estimated
    return Cleaned(kept, loo, entry)


# -- the auto rule --------------------------------------------------------------------


def auto_k(n: int) -> int:
    """k_c: the neighbours of a row's auto cleaning score among all n rows: 5 % of n, at
    least 10, at most n - 1."""
    return int(min(max(round(CLEAN_AUTO_SHARE * n), CLEAN_AUTO_MIN_K), n - 1))


def sample_k(k_c: int, m: int, n: int) -> int:
    """k_s: neighbours in a uniform sample of m of n rows standing for k_c among all n."""
    return int(min(max(1, round(k_c * m / n)), m - 1))


def max_drop(n: int, min_keep: int) -> int:
    """The most rows a rule may remove: never more than half, never below ``min_keep``."""
    return max(0, min(n // 2, n - min_keep))


def log_score(mean_distance: np.ndarray) -> np.ndarray:
    """s = log(mean distance) (float64), floored so that duplicates (distance 0) stay
    finite."""
    return np.log(np.maximum(mean_distance, np.finfo(np.float32).tiny))


def robust_centre_scale(s: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 MAD) of scores ``s``; 1.2533 x the mean absolute deviation when the
    MAD is 0; a scale of 0 when every score is equal (then nothing can be called far)."""
    centre = float(np.median(s))
    dev = np.abs(s - centre)
    scale = MAD_SCALE * float(np.median(dev))
    return centre, scale if scale > 0 else MEAN_AD_SCALE * float(dev.mean())


def over_threshold(s: np.ndarray, threshold: float, most: int) -> np.ndarray:
    """Kept mask (n,): rows with s <= ``threshold``; of those above it, only the ``most``
    highest go (ties: the lower row first)."""
    over = np.flatnonzero(s > threshold)
    if len(over) > most:
        over = over[np.argsort(-s[over], kind="stable")[:most]]
    kept = np.ones(len(s), bool)
    kept[over] = False
    return kept


@dataclasses.dataclass
class SampleFit:
    """The auto rule's rounds on a sample of m rows: ``scores`` (m,) against the sample
    rows ``against`` (m,) bool (each row's own id left out), the ``centre`` and ``scale``
    of the scores over ``against``, ``threshold`` = centre + min(z scale, ratio) (inf when
    the scale is 0 and there is no ratio), and ``kept`` (m,) bool: the rows at or below
    it."""

    scores: np.ndarray
    against: np.ndarray
    kept: np.ndarray
    centre: float
    scale: float
    threshold: float
    rounds: int
    converged: bool


def fit_sample(x: np.ndarray, k: int, *, z: float = CLEAN_AUTO_Z,
               ratio: float | None = CLEAN_AUTO_RATIO, rounds: int = CLEAN_AUTO_ROUNDS,
               most: int | None = None) -> SampleFit:
    """The auto rule's rounds on the rows x (m, d) float32, k neighbours each: score every
    row against the rows kept (all at first), drop those above median + min(z scale,
    ``ratio``) of the kept rows' scores (no cap when ``ratio`` is None), again until the
    kept set stops changing or ``rounds`` are done. ``most``: the most rows removed
    (default: half, and at least k + 1 rows stay)."""
    m = len(x)
    most = min(max_drop(m, k + 1), m if most is None else most)
    hood = _Neighbourhood(x, k)
    kept = np.ones(m, bool)
    for r in range(1, rounds + 1):
        s = hood.scores(kept)
        centre, scale = robust_centre_scale(s[kept])
        threshold = centre + min(z * scale if scale > 0 else float("inf"),
                                 float("inf") if ratio is None else ratio)
        new = over_threshold(s, threshold, most)
        if (new == kept).all() or r == rounds:
            return SampleFit(s, kept, new, centre, scale, threshold, r, bool((new == kept).all()))
        kept = new
    raise AssertionError("unreachable")  # pragma: no cover


class _Neighbourhood:
    """The rows x (m, d) and their k' = 2k + 10 nearest other rows, searched once, from which
    each round's scores against the kept rows are taken; a row with fewer than k kept among
    them is searched again against the kept rows."""

    def __init__(self, x: np.ndarray, k: int):
        self.x, self.k = x, k
        wide = min(len(x) - 1, 2 * k + 10)
        ids = np.arange(len(x), dtype=np.int64)
        self.D, self.I = streams.drop_self(*_search(_Flat(x), x, wide + 1), ids)

    def scores(self, kept: np.ndarray) -> np.ndarray:
        """(m,) float64: log of each row's mean distance to its k nearest kept other rows."""
        ok = kept[self.I]
        take = ok & (np.cumsum(ok, axis=1) <= self.k)
        mean = np.where(take, self.D, 0).sum(axis=1, dtype=np.float64) / self.k
        short = np.flatnonzero(take.sum(axis=1) < self.k)
        if len(short):
            ids = np.flatnonzero(kept)
            D, I = _search(_Flat(self.x[ids]), self.x[short], self.k + 1)
            mean[short] = streams.drop_self(D, ids[I], short)[0].mean(axis=1, dtype=np.float64)
        return log_score(mean)


class _Flat:
    """An IndexFlatL2 over rows (m, d) shifted by their mean (as dn2ops.index.knn, so that
    float32 distances do not cancel). Not re-ranked: a cleaning score is a mean over many
    neighbours compared on a log scale, far coarser than float32's round-off."""

    def __init__(self, xb: np.ndarray):
        self.shift = xb.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.index = faiss.IndexFlatL2(xb.shape[1])
        self.index.add(xb - self.shift)


def _search(flat: _Flat, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``D`` (nq, k) float32 Euclidean distances (ascending) and ``I`` (nq, k) int64."""
    D = np.empty((len(xq), k), np.float32)
    I = np.empty((len(xq), k), np.int64)
    for a in range(0, len(xq), _QUERY_BLOCK):
        D2, I[a:a + _QUERY_BLOCK] = flat.index.search(xq[a:a + _QUERY_BLOCK] - flat.shift, k)
        D[a:a + _QUERY_BLOCK] = np.sqrt(np.maximum(D2, 0))
    return D, I


def score_rows(chunks: Iterator[np.ndarray], sample: np.ndarray | _Flat, k: int, *,
               over: tuple[np.ndarray, float, dict[int, np.ndarray]] | None = None
               ) -> np.ndarray:
    """(n,) float64: log of every streamed row's mean distance to its k nearest rows of
    ``sample`` (m', d) float32 (or its _Flat), one chunk, then one block of queries, at a
    time (a block's k distances are all it holds beside the chunk). ``over`` = (ids,
    threshold, out): the rows of ``ids`` (sorted) scoring above ``threshold`` are copied
    into ``out`` {id: row} as they pass."""
    flat = sample if isinstance(sample, _Flat) else _Flat(sample)
    parts: list[np.ndarray] = []
    start = 0
    for x in chunks:
        mean = np.zeros(len(x))
        for a in range(0, len(x), _QUERY_BLOCK):
            D2, _ = flat.index.search(x[a:a + _QUERY_BLOCK] - flat.shift, k)
            mean[a:a + _QUERY_BLOCK] = np.sqrt(np.maximum(D2, 0)).mean(axis=1,
                                                                       dtype=np.float64)
        parts.append(log_score(mean))
        if over is not None:
            ids, threshold, out = over
            lo, hi = np.searchsorted(ids, [start, start + len(x)])
            for i in ids[lo:hi][parts[-1][ids[lo:hi] - start] > threshold]:
                out[int(i)] = x[i - start].copy()
        start += len(x)
    return np.concatenate(parts) if parts else np.zeros(0)


def auto(rows: Rows, n: int, config: IndexConfig, min_keep: int, *,
         gather: np.ndarray | None = None) -> Cleaned:
    """The auto rule over the n rows ``rows()`` yields (see the module's docstring): scores
    (n,) float64, s = log(mean distance to the k_s nearest kept sample rows). ``gather``:
    as `clean`'s (the rows of those ids that go are copied in the passes made anyway)."""
    if n < CLEAN_AUTO_MIN_ROWS or n - 1 < 2:
        return off(n, f"{n} normal rows: the auto rule needs at least {CLEAN_AUTO_MIN_ROWS} "
                      "to estimate their spread; nothing removed")
    k_c = auto_k(n)
    m = n if config.clean_sample is None else min(n, config.clean_sample)
    ids = streams.sample_ids(n, m, config.seed + 5)
    x = streams.gather_rows(rows(), ids)
    k_s = sample_k(k_c, m, n)
    fit = fit_sample(x, k_s)
    # A row goes only above the threshold: the gathered rows of ``gather`` are those above
    # it, the sample's (by their own scores) from x, the others' as the pass reads them.
    wanted = None if gather is None else np.asarray(gather, np.int64)
    removed_rows: dict[int, np.ndarray] | None = None if wanted is None else {}
    if removed_rows is not None:
        for pos in np.flatnonzero((fit.scores > fit.threshold) & np.isin(ids, wanted)):
            removed_rows[int(ids[pos])] = x[pos].copy()
    if m == n:
        scores = fit.scores  # the sample is every row, in order: the exact rule
    else:
        flat = _Flat(x[fit.against])
        del x  # the pass holds one chunk and the kept sample's index
        rest = None if wanted is None else np.setdiff1d(wanted, ids, assume_unique=True)
        scores = score_rows(rows(), flat, k_s, over=None if rest is None
                            else (rest, fit.threshold, removed_rows))
        scores[ids] = fit.scores  # sample rows: their own, leaving themselves out
    kept = over_threshold(scores, fit.threshold, max_drop(n, min_keep))
    entry = {**_entry("auto", n, kept, _finite(fit.threshold),
                      sample=None if m == n else m, rounds=fit.rounds),
             "k_c": k_c, "k_s": k_s, "z": CLEAN_AUTO_Z, "ratio": CLEAN_AUTO_RATIO,
             "median": fit.centre,
             "scale": fit.scale, "converged": fit.converged,
             "sample_kept": int(fit.against.sum())}
    LOG.info("cleaning (auto): %s of %s normal images removed (estimated contamination "
             "%.2f %%; k_c %s, %s round(s), %s)", entry["removed"], n,
             100 * entry["estimated_rate"], k_c, fit.rounds,
             "exact" if m == n else f"scored against a sample of {m:,}")
    return Cleaned(kept, scores, entry, removed_rows)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
