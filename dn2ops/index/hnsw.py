"""HNSW graph indexes (faiss IndexHNSWFlat): approximate k-NN many times faster than
exact search, for normal sets whose vectors fit in memory.

Built from a chunk stream (see dn2ops.index.streams): the vectors are added chunk by
chunk; the graph and the vectors live in memory (for sets beyond memory use
dn2ops.index.ivf with on-disk lists). The same pass feeds the exact search that
recall@k is measured against, on a uniform sample of the normal set
(leave-one-out, as for the percentile reference), and efSearch is the smallest
of 16, 32, 64, ... whose recall reaches the target (or the one given).

HNSW computes every distance directly from coordinate differences, so unlike
faiss's BLAS flat search it needs no centring (see dn2ops.index.knn). Its scores are
approximate: a missed neighbour is replaced by a farther one, so they are never
below the exact scores; the manifest records the recall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np

from dn2ops.errors import ConfigError
from dn2ops.index import recall

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
        raise ConfigError(f"--hnsw M must be >= 2, got {m}")
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
    return recall.search_filled(
        index, xq, k, lambda: (faiss.downcast_index(index).hnsw, "efSearch", int(index.ntotal)))


def build(chunks: Callable[[], Iterator[np.ndarray]], n: int, d: int, *, k: int, m: int,
          q_ids: np.ndarray, xq: np.ndarray, ef_search: int | None = None,
          target_recall: float = 0.95) -> tuple[faiss.Index, dict[str, Any]]:
    """Fills an HNSW index with the ``n`` vectors of ``chunks()`` (global ids in order).

    ``q_ids``, ``xq``: ids and rows of the uniform sample recall is measured on.
    Returns (index with efSearch set, info for the manifest).
    """
    if n < k + 2:
        raise ConfigError(f"an HNSW index needs at least k + 2 = {k + 2} vectors, got {n}")
    index = new_index(d, m)

    def add_and_pass() -> Iterator[np.ndarray]:
        for chunk in chunks():
            index.add(chunk)
            yield chunk

    I_exact = recall.exact_ids(xq, q_ids, add_and_pass(), k)
    if index.ntotal != n:
        raise RuntimeError(f"the HNSW index holds {index.ntotal} vectors, expected {n}")
    chosen, curve = recall.measure(lambda x, kk: search(index, x, kk),
                                   lambda ef: set_ef(index, ef), xq, q_ids, I_exact,
                                   EF_SEARCH, target_recall, ef_search)
    info = {"m": int(m), "ef_construction": EF_CONSTRUCTION, "ef_search": chosen,
            "recall": recall.recall_info(k, q_ids, target_recall, curve, curve[chosen],
                                         "ef_search", "HNSW")}
    return index, info
