"""dn2ops.index.ivf: IVF indexes from a chunk stream, against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from dn2ops.index import ivf, streams
from tests.conftest import brute_knn, clustered


def _build(X, nlist=4, **kw):
    q_ids = streams.sample_ids(len(X), 50, seed=1)
    return ivf.build(lambda: iter([X[:100], X[100:]]), len(X), X.shape[1], k=2, nlist=nlist,
                     train_x=X, q_ids=q_ids, xq=X[q_ids], **kw)


def test_all_lists_probed_gives_exact_neighbours():
    X = clustered(300)
    index, info = _build(X, nprobe=4)
    assert info["nlist"] == 4 and info["nprobe"] == 4 and index.ntotal == 300
    assert info["recall"]["recall_at_k"] == 1.0 and info["recall"]["queries"] == 50
    xq = X[:30] + 0.5
    D, I = ivf.search(index, xq, 3)
    Dr, Ir = brute_knn(xq, X, 3)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_allclose(D, Dr, rtol=1e-4)


def test_nprobe_is_the_smallest_power_of_two_reaching_the_target():
    X = clustered(400, seed=3)
    _, info = _build(X, nlist=16, target_recall=0.99)
    curve = {int(p): r for p, r in info["recall"]["at_nprobe"].items()}
    chosen = info["nprobe"]
    assert chosen in curve and all(p & (p - 1) == 0 or p == 16 for p in curve)
    assert all(r < 0.99 for p, r in curve.items() if p < chosen)
    assert info["recall"]["target_reached"] == (curve[chosen] >= 0.99)


def test_rows_short_of_k_are_searched_over_every_list():
    X = clustered(300)
    index, _ = _build(X, nlist=8, nprobe=1)
    ivf.set_nprobe(index, 1)
    D, I = ivf.search(index, X[:5], 200)  # more than one list holds
    assert (I >= 0).all() and ivf.ivf_of(index).nprobe == 1


def test_pq_must_divide_the_dimension():
    with pytest.raises(ValueError, match="--pq M must divide the dimension 8"):
        ivf.new_index(8, 4, pq=3)
    assert ivf.train_size(100, 4) == 100 and ivf.train_size(10_000, 4) == 256
