"""dn2ops.hnsw: HNSW graphs built from a chunk stream, against brute-force numpy."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from dn2ops import hnsw, ivf, streams
from tests.conftest import brute_knn, clustered

X = clustered(1000, d=16, centers=10, seed=6)
Q_IDS = streams.sample_ids(len(X), 100, seed=2)


def _build(**kw):
    return hnsw.build(lambda: iter([X[:400], X[400:]]), len(X), X.shape[1], k=2, m=8,
                      q_ids=Q_IDS, xq=X[Q_IDS], **kw)


def test_graph_search_agrees_with_brute_force_at_high_effort():
    index, info = _build(ef_search=256)
    assert index.ntotal == len(X) and info["ef_search"] == 256
    assert faiss.downcast_index(index).hnsw.efConstruction == hnsw.EF_CONSTRUCTION
    D, I = hnsw.search(index, X[:50] + 0.01, 3)
    D_ex, I_ex = brute_knn(X[:50] + 0.01, X, 3)
    assert ivf.recall_at_k(I, I_ex) >= 0.98
    assert (D >= D_ex - 1e-3).all()  # a miss is replaced by a farther neighbour


def test_ef_search_is_tuned_to_the_target_and_recorded():
    index, info = _build(target_recall=0.9)
    curve = {int(e): r for e, r in info["recall"]["at_ef_search"].items()}
    assert list(curve) == list(hnsw.EF_SEARCH[:len(curve)])
    assert info["ef_search"] == min(e for e, r in curve.items() if r >= 0.9)
    assert faiss.downcast_index(index).hnsw.efSearch == info["ef_search"]
    assert info["recall"]["target_reached"] is True


def test_every_row_gets_k_neighbours_and_bad_m_is_refused():
    index, _ = _build(ef_search=16)
    D, I = hnsw.search(index, X[:10], 60)  # more than efSearch: searched again
    assert (I >= 0).all() and (np.diff(D, axis=1) >= -1e-4).all()
    assert faiss.downcast_index(index).hnsw.efSearch == 16  # restored
    with pytest.raises(ValueError, match="--hnsw M must be >= 2"):
        hnsw.new_index(16, 1)
