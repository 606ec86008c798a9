"""Decisions at scoring time: which rows of a partition are flagged, and whether its
normal rows still look like the normal set (issue 28).

Every scored row has a conformal p-value of its score against the index's normal
reference (dn2ops.index.calibration: (1 + #{reference >= score}) / (n + 1), or the
fitted tail's beyond the rank's resolution). For a fixed reference p falls as the score
rises, so each rule is a cut on the score: the lowest flagged score (the threshold),
found once from the partition's sorted scores, then ``flagged = score >= threshold`` row
by row.

* ``fdr`` (Benjamini-Hochberg at level q across the partition): among the flagged rows
  at most a fraction q are expected to be normal ones.
* ``alpha``: every row with p <= alpha (each normal row is flagged with chance alpha).

Drift: the p-values of normal rows are uniform, anomalies' are small. The
Kolmogorov-Smirnov test of the p-values above DRIFT_LOWER against the uniform on
(DRIFT_LOWER, 1] looks at normal-looking rows only, so a partition full of anomalies
does not trip it, while normal rows that moved (camera, light, product) do. Its level,
cut and minimum rows are benchmarks/calibration.py's ``drift`` table's.

A reference is any object with ``p_values(scores) -> (p (m,) float64, source (m,))``,
``n`` (its scores), ``floor`` (the smallest p it can give) and ``tail`` (None when no
tail was fitted): dn2ops.index.calibration.Reference.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
from scipy import stats

DRIFT_LOWER = 0.2  # the drift test looks at p in (DRIFT_LOWER, 1]
DRIFT_MIN_ROWS = 50  # fewer p-values above DRIFT_LOWER: no drift test
DRIFT_LEVEL = 0.001  # warn when the KS test's p-value is below this


class Reference(Protocol):
    n: int
    floor: float
    tail: Any

    def p_values(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def bh_flags(p: np.ndarray, q: float) -> np.ndarray:
    """Benjamini-Hochberg at level q: flags (m,) bool, the R smallest p-values where R is
    the largest r with p_(r) <= q r / m."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return np.zeros(0, bool)
    order = np.argsort(p, kind="stable")
    ok = np.flatnonzero(p[order] <= q * np.arange(1, m + 1) / m)
    flags = np.zeros(m, bool)
    if len(ok):
        flags[order[:ok[-1] + 1]] = True
    return flags


def _lowest_flagged(sorted_scores: np.ndarray, flags: np.ndarray) -> float:
    return float(sorted_scores[flags].min()) if flags.any() else math.inf


def bh_cut(sorted_scores: np.ndarray, p: np.ndarray, q: float) -> float:
    """The lowest score (m,) that BH at q flags given the scores' p-values (m,); +inf when
    none. BH flags every p-value up to its cut-off, ties included, and p falls with the
    score, so its flags are exactly the scores >= this threshold."""
    return _lowest_flagged(np.asarray(sorted_scores, np.float64), bh_flags(p, q))


def bh_threshold(sorted_scores: np.ndarray, reference: Reference, q: float) -> float:
    """The score threshold Benjamini-Hochberg at level q implies for a partition whose
    scores (m,) ascending are ``sorted_scores``: flag the scores >= it (+inf: none)."""
    s = np.asarray(sorted_scores, np.float64)
    return bh_cut(s, reference.p_values(s)[0], q)


def alpha_cut(sorted_scores: np.ndarray, p: np.ndarray, alpha: float) -> float:
    """The lowest score whose p-value is <= alpha; +inf when none."""
    return _lowest_flagged(np.asarray(sorted_scores, np.float64), np.asarray(p) <= alpha)


def alpha_threshold(sorted_scores: np.ndarray, reference: Reference, alpha: float) -> float:
    """The score threshold of p <= alpha among a partition's scores (m,) ascending."""
    s = np.asarray(sorted_scores, np.float64)
    return alpha_cut(s, reference.p_values(s)[0], alpha)


def drift_test(p: np.ndarray, *, level: float = DRIFT_LEVEL, lower: float = DRIFT_LOWER,
               min_rows: int = DRIFT_MIN_ROWS, n_reference: int | None = None
               ) -> dict[str, Any]:
    """Kolmogorov-Smirnov test of the p-values (m,) above ``lower``, rescaled, against the
    uniform on (0, 1]: {test, lower, level, rows, statistic, pvalue, warn}; ``warn``
    when its p-value is below ``level``. Fewer than ``min_rows`` rows above ``lower``:
    statistic and pvalue None, no warning.

    ``n_reference``: the reference's size; the statistic is then read as the two-sample
    one (the reference's own sampling noise: p-values are ranks among n scores) with the
    effective size m' n' / (m' + n') of the rows and reference scores above the cut,
    n' = (1 - lower) n. Without it, scipy's one-sample test.
    """
    p = np.asarray(p, dtype=np.float64)
    u = (p[p > lower] - lower) / (1.0 - lower)
    out = {"test": "ks-uniform", "lower": lower, "level": level, "rows": int(len(u)),
           "statistic": None, "pvalue": None, "warn": False}
    if len(u) < min_rows:
        return out
    res = stats.kstest(u, "uniform")
    stat, pvalue = float(res.statistic), float(res.pvalue)
    if n_reference is not None:
        m, nr = len(u), (1.0 - lower) * n_reference
        pvalue = float(stats.kstwobign.sf(stat * math.sqrt(m * nr / (m + nr))))
    return {**out, "statistic": stat, "pvalue": pvalue, "warn": bool(pvalue < level)}


def _fmt_level(level: float) -> str:
    return f"{100 * level:g} %"


def resolution_warning(rule: str, level: float, rows: int, reference: Reference
                       ) -> str | None:
    """Why a rule cannot flag what it is asked to with this reference, or None.

    p-values go no lower than ``reference.floor``; --alpha below it flags nothing (the
    command refuses it before it starts), and BH over ``rows`` rows flags a lone anomaly
    only at p <= q / rows."""
    floor = float(reference.floor)
    need = level if rule == "alpha" else level / max(rows, 1)
    if not rows or floor <= need:
        return None
    what = (f"--alpha {level:g} asks for p <= {level:.2g}" if rule == "alpha" else
            f"Benjamini-Hochberg at {_fmt_level(level)} over {rows:,} rows flags a lone "
            f"anomaly only at p <= {need:.2g}")
    if rule == "alpha" or floor > level:
        then = "nothing can be flagged"
    else:
        then = (f"a lone anomaly cannot be flagged (BH needs {math.ceil(floor * rows / level)}"
                " rows at that p together)")
    fix = f"use --alpha >= {floor:.2g} or " if rule == "alpha" else ""
    return (f"{what}, but the normal reference of {reference.n:,} scores gives p no lower "
            f"than {floor:.2g}{'' if reference.tail is not None else ' (no fitted tail)'}: "
            f"{then}; {fix}build the index from more normal images (or --reference-sample "
            "all)")


def drift_warning(drift: dict[str, Any]) -> str:
    return (f"the partition's normal images no longer look like the normal set: their "
            f"{drift['rows']:,} p-values above {drift['lower']:g} are not uniform "
            f"(Kolmogorov-Smirnov p = {drift['pvalue']:.2g} < {drift['level']:g}); check what "
            "changed (camera, lighting, product) and rebuild the index from recent normal "
            "images if the change is the new normal")


def decide(sorted_scores: np.ndarray, reference: Reference, rule: str, level: float
           ) -> dict[str, Any]:
    """A partition's decision, from its scores (m,) ascending: summary.json's ``flags``
    ({rule, level, flagged, threshold (None: nothing flagged), p_value_floor,
    reference_n}), ``drift`` (drift_test of the partition's p-values) and ``warnings``."""
    s = np.asarray(sorted_scores, np.float64)
    p = reference.p_values(s)[0]
    threshold = (bh_cut if rule == "fdr" else alpha_cut)(s, p, level)
    flagged = int(len(s) - np.searchsorted(s, threshold, side="left"))
    drift = drift_test(p, n_reference=reference.n)
    warnings = [w for w in (resolution_warning(rule, level, len(s), reference),
                            drift_warning(drift) if drift["warn"] else None) if w]
    return {"flags": {"rule": rule, "level": level, "flagged": flagged,
                      "threshold": threshold if math.isfinite(threshold) else None,
                      "p_value_floor": float(reference.floor), "reference_n": int(reference.n)},
            "drift": drift, "warnings": warnings}


def no_decision(why: str) -> dict[str, Any]:
    """The decision of rows that have no p-value (covtrace sets: no normal reference)."""
    return {"flags": {"rule": None, "why": why}, "drift": None, "warnings": []}
