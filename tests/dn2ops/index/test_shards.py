"""dn2ops.index.shards: flat shards written from a chunk stream and loaded back one at a
time, against the rows and brute-force numpy."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dn2ops.index.knn import knn_sharded
from dn2ops.index.shards import shard_loader, shard_sizes, write_flat_shards
from dn2ops.io import outputs
from tests.conftest import brute_knn, clustered


def test_shard_sizes_by_hand():
    assert shard_sizes(10, 3, [10]) == [3, 3, 4]  # equal parts, by np.linspace
    assert shard_sizes(2, 5, [2]) == [1, 1]  # never more shards than rows
    assert shard_sizes(9, None, [4, 0, 5]) == [4, 5]  # one per non-empty feature shard


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
