"""Recall of an approximate index against exact search, and tuning its search effort.

Shared by dn2ops.ivf (nprobe) and dn2ops.hnsw (efSearch): the build measures
recall@k on a uniform sample of the normal set at increasing effort and keeps
the smallest effort that reaches the target; the manifest records the curve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def recall_at_k(I_approx: np.ndarray, I_exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbour ids (nq, k) found in the approximate row."""
    hits = [len(set(a) & set(e)) for a, e in zip(I_approx.tolist(), I_exact.tolist(),
                                                 strict=True)]
    return float(np.sum(hits) / I_exact.size)


def tune(ids_at: Callable[[int], np.ndarray], I_exact: np.ndarray, efforts: Sequence[int],
         target: float, fixed: int | None = None) -> tuple[int, dict[int, float]]:
    """(chosen effort, {effort: recall@k}).

    ``ids_at(e)``: the approximate neighbour ids (nq, k) at effort ``e``. Tries
    ``efforts`` in increasing order and stops at the first whose recall reaches
    ``target`` (the largest if none does); with ``fixed`` measures only that one.
    """
    curve: dict[int, float] = {}
    for e in [fixed] if fixed else efforts:
        curve[int(e)] = recall_at_k(ids_at(int(e)), I_exact)
        if fixed is None and curve[int(e)] >= target:
            break
    chosen = fixed or next((e for e, r in curve.items() if r >= target), int(efforts[-1]))
    return int(chosen), curve
