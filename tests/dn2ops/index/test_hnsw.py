"""dn2ops.index.hnsw: HNSW graph indexes from a chunk stream, against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from dn2ops.index import hnsw, streams
from tests.conftest import brute_knn, clustered


def _build(X, **kw):
    q_ids = streams.sample_ids(len(X), 60, seed=1)
    return hnsw.build(lambda: iter([X[:50], X[50:]]), len(X), X.shape[1], k=2, m=8,
                      q_ids=q_ids, xq=X[q_ids], **kw)


def test_a_wide_search_gives_the_exact_neighbours():
    X = clustered(250)
    index, info = _build(X, ef_search=256)
    assert info["ef_search"] == 256 and info["recall"]["recall_at_k"] == 1.0
    assert info["recall"]["at_ef_search"] == {"256": 1.0} and index.ntotal == 250
    xq = X[:25] + 0.5
    D, I = hnsw.search(index, xq, 3)
    Dr, Ir = brute_knn(xq, X, 3)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, rtol=1e-4)


def test_ef_search_is_the_smallest_reaching_the_target():
    X = clustered(250, seed=2)
    _, info = _build(X, target_recall=0.9)
    curve = {int(e): r for e, r in info["recall"]["at_ef_search"].items()}
    assert list(curve) == list(hnsw.EF_SEARCH[:len(curve)])
    assert all(r < 0.9 for e, r in curve.items() if e < info["ef_search"])


def test_too_few_vectors_and_too_small_m_are_refused():
    with pytest.raises(ValueError, match="at least k \\+ 2 = 4 vectors"):
        _build(clustered(3))
    with pytest.raises(ValueError, match="--hnsw M must be >= 2"):
        hnsw.new_index(8, 1)
