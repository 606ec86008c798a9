"""HNSW graph indexes (faiss IndexHNSWFlat): approximate k-NN many times faster than
exact search, for normal sets whose vectors fit in memory.

Built from a chunk stream (see dn2ops.streams): the vectors are added chunk by
chunk; the graph and the vectors live in memory (for sets beyond memory use
dn2ops.ivf with on-disk lists). The same pass feeds the exact search that
recall@k is measured against, on a uniform sample of the normal set
(leave-one-out, as for the percentile reference), and efSearch is the smallest
of 16, 32, 64, ... whose recall reaches the target (or the one given).

HNSW computes every distance directly from coordinate differences, so unlike
faiss's BLAS flat search it needs no centring (see dn2ops.knn). Its scores are
approximate: a missed neighbour is replaced by a farther one, so they are never
below the exact scores; the manifest records the recall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np

from dn2ops import streams
from dn2ops.knn import as_float32, knn_sharded
from dn2ops.recall import tune

INDEX_FILE = "hnsw.faiss"
# Graph-building effort: twice faiss's default of 40. On the 100k x 1280-d set of
# benchmarks/throughput.py, 40 gave recall@2 0.93-0.94 at every efSearch from 16 to 512
# (some points were not reached at all), 80 gave 0.985 at efSearch 16. Search effort is
# tuned per index.
EF_CONSTRUCTION = 80
EF_SEARCH = (16, 32, 64, 128, 256, 512, 1024)


def new_index(d: int, m: int) -> faiss.IndexHNSWFlat:
    """An empty HNSW index with ``m`` neighbours per node (faiss's M)."""
    if m < 2:
        raise ValueError(f"--hnsw M must be >= 2, got {m}")
    index = faiss.IndexHNSWFlat(d, int(m), faiss.METRIC_L2)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    return index


def set_ef(index: faiss.Index, ef: int) -> None:
    faiss.downcast_index(index).hnsw.efSearch = int(ef)


def search(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k-NN: ``D`` float32 (nq, k) Euclidean (not squared), ``I`` int64 (nq, k).

    Rows the graph search left short of k neighbours are searched again with
    efSearch raised to the whole index, so every row has k real neighbours.
    """
    xq = as_float32(xq, name="xq")
    D2, I = index.search(xq, k)
    short = (I < 0).any(axis=1)
    if short.any():
        hnsw = faiss.downcast_index(index).hnsw
        saved = hnsw.efSearch
        hnsw.efSearch = int(index.ntotal)
        try:
            D2[short], I[short] = index.search(xq[short], k)
        finally:
            hnsw.efSearch = saved
    return np.sqrt(np.maximum(D2, 0)).astype(np.float32), I


def build(chunks: Callable[[], Iterator[np.ndarray]], n: int, d: int, *, k: int, m: int,
          q_ids: np.ndarray, xq: np.ndarray, ef_search: int | None = None,
          target_recall: float = 0.95) -> tuple[faiss.Index, dict[str, Any]]:
    """Fills an HNSW index with the ``n`` vectors of ``chunks()`` (global ids in order).

    ``q_ids``, ``xq``: ids and rows of the uniform sample recall is measured on.
    Returns (index with efSearch set, info for the manifest).
    """
    if n < k + 2:
        raise ValueError(f"an HNSW index needs at least k + 2 = {k + 2} vectors, got {n}")
    index = new_index(d, m)

    def add_and_pass() -> Iterator[np.ndarray]:
        for chunk in chunks():
            index.add(chunk)
            yield chunk

    De, Ie = knn_sharded(xq, add_and_pass(), k + 1)
    _, Ie = streams.drop_self(De, Ie, q_ids)
    if index.ntotal != n:
        raise RuntimeError(f"the HNSW index holds {index.ntotal} vectors, expected {n}")

    def ids_at(ef: int) -> np.ndarray:
        set_ef(index, ef)
        Da, Ia = search(index, xq, k + 1)
        return streams.drop_self(Da, Ia, q_ids)[1]

    chosen, curve = tune(ids_at, Ie, EF_SEARCH, target_recall, ef_search)
    set_ef(index, chosen)
    info = {"m": int(m), "ef_construction": EF_CONSTRUCTION, "ef_search": chosen,
            "recall": {"k": k, "queries": int(len(q_ids)), "target": target_recall,
                       "at_ef_search": {str(e): round(r, 4) for e, r in curve.items()},
                       "recall_at_k": round(curve[chosen], 4),
                       "target_reached": bool(curve[chosen] >= target_recall),
                       "how": "leave-one-out neighbours of a uniform sample of the normal "
                              "set, HNSW against exact"}}
    return index, info
