"""dn2ops.index.shards: flat shards written from a chunk stream and loaded back one at a
time, against the rows and brute-force numpy."""

from __future__ import annotations

import hashlib

import faiss
import numpy as np
import pytest

from dn2ops.index.knn import knn_sharded
from dn2ops.index.shards import reserved_flat, shard_loader, shard_sizes, write_flat_shards
from dn2ops.io import outputs
from tests.conftest import brute_knn, clustered


def test_shard_sizes_by_hand():
    assert shard_sizes(10, 3, [10]) == [3, 3, 4]  # equal parts, by np.linspace
    assert shard_sizes(2, 5, [2]) == [1, 1]  # never more shards than rows
    assert shard_sizes(9, None, [4, 0, 5]) == [4, 5]  # one per non-empty feature shard


def test_reserved_flat_fills_in_place_and_serializes_as_a_plain_index():
    X = clustered(300, seed=8)
    index = reserved_flat(X.shape[1], len(X))
    assert index.ntotal == 0
    index.add(X[:7])
    at = index.codes.data()
    for a in range(7, len(X), 7):  # many small adds: a plain vector would move several times
        index.add(X[a:a + 7])
        assert index.codes.data() == at  # never reallocated (no second copy of the rows)
    plain = faiss.IndexFlatL2(X.shape[1])
    plain.add(X)
    assert bytes(faiss.serialize_index(index)) == bytes(faiss.serialize_index(plain))
    # more rows than reserved still work (the vector grows as before)
    index.add(X[:5])
    assert index.ntotal == len(X) + 5
    np.testing.assert_array_equal(faiss.rev_swig_ptr(index.get_xb(), (len(X) + 5) * X.shape[1])
                                  .reshape(-1, X.shape[1])[-5:], X[:5])


@pytest.mark.parametrize("root", ["local", "memory://dn2-shards"])
def test_written_shards_load_back_and_search_as_the_rows(tmp_path, root):
    X = clustered(230, seed=6)
    fs, path = outputs.fs_and_path(str(tmp_path) if root == "local" else root)
    chunks = [X[:100], X[100:101], X[101:]]  # chunks unlike the shards
    checksums = write_flat_shards(fs, path, iter(chunks), [80, 80, 70])
    names = sorted(checksums)
    assert names == [f"shard-0000{i}-of-00003.faiss" for i in range(3)]
    for name, sha in checksums.items():
        assert hashlib.sha256(fs.cat_file(outputs.join(path, name))).hexdigest() == sha
    # shards grown a chunk at a time are the files of the shards' rows added at once
    whole = write_flat_shards(fs, outputs.join(path, "whole"), iter([X]), [80, 80, 70])
    assert whole == checksums
    load = shard_loader(fs, path, names, "cpu")
    assert [len(s) for s in load()] == [80, 80, 70]
    xq = clustered(20, seed=7)
    D, I = knn_sharded(xq, load(), 3)  # global ids: the shards in order
    D_ref, I_ref = brute_knn(xq, X, 3)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5)
