"""dn2ops.index.recall: recall@k, effort tuning and the shared approximate search, by hand."""

from __future__ import annotations

import faiss
import numpy as np

from dn2ops.index import recall
from tests.conftest import brute_knn


def test_recall_at_k_counts_shared_ids():
    exact = np.array([[1, 2], [3, 4]])
    assert recall.recall_at_k(np.array([[2, 1], [3, 9]]), exact) == 0.75
    assert recall.recall_at_k(exact, exact) == 1.0


def test_tune_stops_at_the_first_effort_reaching_the_target():
    exact = np.array([[1, 2]] * 4)
    # effort e finds the right neighbours for the first e rows
    def ids_at(e):
        return np.array([[1, 2] if i < e else [7, 8] for i in range(4)])

    assert recall.tune(ids_at, exact, [1, 2, 3, 4], target=0.7) == (3, {1: .25, 2: .5, 3: .75})
    chosen, curve = recall.tune(ids_at, exact, [1, 2], target=0.9)
    assert chosen == 2 and curve == {1: .25, 2: .5}  # none reaches it: the largest
    assert recall.tune(ids_at, exact, [1, 2], target=0.9, fixed=4) == (4, {4: 1.0})


def test_exact_ids_leave_each_sampled_row_out():
    X = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    q_ids = np.array([0, 5, 39])
    got = recall.exact_ids(X[q_ids], q_ids, iter([X[:17], X[17:]]), k=3)
    _, I = brute_knn(X[q_ids], X, 4)
    np.testing.assert_array_equal(got, I[:, 1:])  # the nearest is each row itself


def test_search_filled_widens_the_effort_for_short_rows_and_restores_it():
    X = np.random.default_rng(2).normal(size=(200, 4)).astype(np.float32)
    index = faiss.IndexHNSWFlat(4, 4)
    index.add(X)
    hnsw = index.hnsw
    hnsw.efSearch = 1
    xq = X[:20] + 0.01
    D, I = recall.search_filled(index, xq, 150, lambda: (hnsw, "efSearch", 200))
    assert (I >= 0).all() and hnsw.efSearch == 1
    R = np.linalg.norm(xq[:, None].astype(np.float64) - X[I], axis=2)
    np.testing.assert_allclose(D, R, rtol=1e-4, atol=1e-5)  # Euclidean, not squared


def test_recall_info_records_the_curve():
    info = recall.recall_info(2, np.arange(10), 0.9, {16: 0.81234, 32: 0.95}, 0.95,
                              "ef_search", "HNSW")
    assert info == {
        "k": 2, "queries": 10, "target": 0.9, "at_ef_search": {"16": 0.8123, "32": 0.95},
        "recall_at_k": 0.95, "target_reached": True,
        "how": "leave-one-out neighbours of a uniform sample of the normal set, HNSW "
               "against exact"}
