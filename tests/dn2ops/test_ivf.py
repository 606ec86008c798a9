"""dn2ops.ivf: IVF indexes built from a chunk stream, against brute-force numpy."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from dn2ops import ivf, streams
from tests.conftest import brute_knn, clustered

X = clustered(1200, d=16, centers=12, seed=5)
Q_IDS = streams.sample_ids(len(X), 100, seed=1)


def chunks():
    return iter([X[:500], X[500:900], X[900:]])


def _build(tmp_path=None, **kw):
    return ivf.build(chunks, len(X), X.shape[1], k=2, nlist=16, train_x=X, q_ids=Q_IDS,
                     xq=X[Q_IDS], ondisk_dir=str(tmp_path) if tmp_path else None, **kw)


def test_search_at_every_list_is_exact_and_ids_are_global():
    index, info = _build(nprobe=16)
    assert index.ntotal == len(X) and info["nprobe"] == 16
    assert info["recall"]["recall_at_k"] == 1.0
    D, I = ivf.search(index, X[:50], 3)
    D_ex, I_ex = brute_knn(X[:50], X, 3)
    np.testing.assert_allclose(D, D_ex, rtol=1e-4, atol=1e-4)
    assert ivf.recall_at_k(I, I_ex) == 1.0


def test_tuned_nprobe_is_the_smallest_power_of_two_reaching_the_target():
    index, info = _build(target_recall=0.9)
    curve = {int(p): r for p, r in info["recall"]["at_nprobe"].items()}
    assert info["nprobe"] == min(p for p, r in curve.items() if r >= 0.9)
    assert all(r < 0.9 for p, r in curve.items() if p < info["nprobe"])
    assert list(curve) == [1, 2, 4, 8, 16][:len(curve)]


def test_rows_short_of_k_neighbours_are_searched_again_over_every_list():
    index, _ = _build(nprobe=1)
    ivf.set_nprobe(index, 1)
    far = X[:5] + 1000.0  # far from everything: its one probed list may hold < k
    D, I = ivf.search(index, far, 40)
    assert (I >= 0).all()
    assert ivf.ivf_of(index).nprobe == 1  # restored


def test_ondisk_lists_equal_in_memory_and_read_back(tmp_path):
    mem, _ = _build(nprobe=4)
    disk, _ = _build(tmp_path, nprobe=4)
    assert not list(tmp_path.glob("_part-*"))
    faiss.write_index(disk, str(tmp_path / ivf.INDEX_FILE))
    back = ivf.read(str(tmp_path / ivf.INDEX_FILE), ondisk=True, nprobe=4)
    for index in (disk, back):
        D, I = ivf.search(index, X[:30], 2)
        D_mem, I_mem = ivf.search(mem, X[:30], 2)
        np.testing.assert_array_equal(I, I_mem)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="NLIST must be >= 1"):
        ivf.new_index(16, 0)
    with pytest.raises(ValueError, match="--pq M must divide the dimension 16"):
        ivf.new_index(16, 4, pq=5)
    with pytest.raises(ValueError, match="at least k \\+ 2"):
        ivf.build(lambda: iter([X[:3]]), 3, 16, k=2, nlist=1, train_x=X[:3],
                  q_ids=np.array([0]), xq=X[:1])
    assert ivf.train_size(100, 16) == 100 and ivf.train_size(10_000, 16) == 1024
