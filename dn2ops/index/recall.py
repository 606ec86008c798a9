"""Recall of an approximate index against exact search, and tuning its search effort.

Shared by dn2ops.index.ivf (nprobe) and dn2ops.index.hnsw (efSearch): the build measures
recall@k on a uniform sample of the normal set at increasing effort and keeps
the smallest effort that reaches the target; the manifest records the curve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import faiss
import numpy as np

from dn2ops.index import streams
from dn2ops.index.knn import as_float32, knn_sharded


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


def search_filled(index: faiss.Index, xq: np.ndarray, k: int,
                  widen: Callable[[], tuple[Any, str, int]],
                  again: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k-NN: ``D`` float32 (nq, k) Euclidean (not squared), ``I`` int64 (nq, k).

    Rows the search left short of k neighbours are searched again (on ``again``, default
    ``index``) with the effort widened to all of the index: ``widen()`` gives (the object,
    its effort attribute, the full effort), restored afterwards. So every row has k real
    neighbours.
    """
    xq = as_float32(xq, name="xq")
    D2, I = index.search(xq, k)
    short = (I < 0).any(axis=1)
    if short.any():
        obj, attr, full = widen()
        saved = getattr(obj, attr)
        setattr(obj, attr, full)
        try:
            D2[short], I[short] = (again or index).search(xq[short], k)
        finally:
            setattr(obj, attr, saved)
    return np.sqrt(np.maximum(D2, 0)).astype(np.float32), I


def exact_ids(xq: np.ndarray, q_ids: np.ndarray, blocks: Iterable[np.ndarray], k: int
              ) -> np.ndarray:
    """The exact leave-one-out neighbour ids (nq, k) of the sampled rows ``xq`` (global ids
    ``q_ids``) over the database ``blocks`` streams (which may fill an index meanwhile)."""
    D, I = knn_sharded(xq, blocks, k + 1)
    return streams.drop_self(D, I, q_ids)[1]


def measure(search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
            set_effort: Callable[[int], None], xq: np.ndarray, q_ids: np.ndarray,
            I_exact: np.ndarray, efforts: Sequence[int], target: float,
            fixed: int | None) -> tuple[int, dict[int, float]]:
    """tune() of an approximate index: its leave-one-out ids at each effort (set by
    ``set_effort``) against ``I_exact``; leaves the chosen effort set."""
    k = I_exact.shape[1]

    def ids_at(effort: int) -> np.ndarray:
        set_effort(effort)
        D, I = search(xq, k + 1)
        return streams.drop_self(D, I, q_ids)[1]

    chosen, curve = tune(ids_at, I_exact, efforts, target, fixed)
    set_effort(chosen)
    return chosen, curve


def recall_info(k: int, q_ids: np.ndarray, target: float, curve: dict[int, float], got: float,
                effort: str, kind: str) -> dict[str, Any]:
    """The manifest's record of the measured recall (``effort``: at_nprobe, ...)."""
    return {"k": k, "queries": int(len(q_ids)), "target": target,
            f"at_{effort}": {str(e): round(r, 4) for e, r in curve.items()},
            "recall_at_k": round(got, 4), "target_reached": bool(got >= target),
            "how": "leave-one-out neighbours of a uniform sample of the normal set, "
                   f"{kind} against exact"}
