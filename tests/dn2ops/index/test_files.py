"""dn2ops.index.files: index files streamed to and from storage in blocks, and IndexDir's
reads checked against the manifest's sha256."""

from __future__ import annotations

import hashlib
import json

import faiss
import numpy as np
import pytest

from dn2ops.config import IndexConfig
from dn2ops.index import IndexError_, build_index
from dn2ops.index.files import IndexDir, read_index, write_index
from dn2ops.io import outputs
from tests.conftest import clustered, write_features


@pytest.mark.parametrize("root", ["local", "memory://dn2-index-io"])
def test_index_files_stream_through_faiss_callbacks(tmp_path, root):
    directory = str(tmp_path) if root == "local" else root
    fs, path = outputs.fs_and_path(directory)
    fs.makedirs(path, exist_ok=True)
    X = clustered(3000, d=64, seed=4)  # > 1 MiB: several callback blocks
    index = faiss.IndexFlatL2(64)
    index.add(X)
    name = outputs.join(path, "shard.faiss")
    sha = write_index(fs, name, index)
    expected = faiss.serialize_index(index).tobytes()  # faiss's own in-memory serialisation
    assert fs.cat_file(name) == expected
    assert sha == hashlib.sha256(expected).hexdigest()
    back = read_index(fs, name, "shard.faiss", sha)
    np.testing.assert_array_equal(faiss.rev_swig_ptr(back.get_xb(), back.ntotal * 64), X.ravel())
    # A byte appended or cut off is caught: by the hash, or by faiss itself.
    fs.pipe_file(name, expected + b"\0")
    with pytest.raises(IndexError_, match="shard.faiss has sha256 .* changed or damaged"):
        read_index(fs, name, "shard.faiss", sha)
    fs.pipe_file(name, expected[:-5])
    with pytest.raises(IndexError_, match="shard.faiss is corrupt or truncated"):
        read_index(fs, name, "shard.faiss", sha)


@pytest.fixture
def index_dir(tmp_path):
    """A committed flat index of 100 rows in two shards, and its rows."""
    X = clustered(100, seed=2)
    write_features(tmp_path / "f", X, [60, 40])
    build_index(str(tmp_path / "f"), str(tmp_path / "i"), IndexConfig(k=2, shards=2))
    return tmp_path / "i", X


def _files(directory, verify=True) -> IndexDir:
    manifest = json.loads((directory / "_SUCCESS").read_text())
    return IndexDir(str(directory), manifest, verify=verify)


def test_index_dir_reads_what_the_manifest_lists(index_dir):
    directory, X = index_dir
    files = _files(directory)
    files.check_present()
    assert files.shard_names == ["shard-00000-of-00002.faiss", "shard-00001-of-00002.faiss"]
    np.testing.assert_array_equal(np.concatenate(list(files.iter_shards())), X)
    data = files.read("normal.parquet")
    assert hashlib.sha256(data).hexdigest() == files.manifest["files"]["normal.parquet"]


def test_index_dir_refuses_missing_and_changed_files(index_dir):
    directory, _ = index_dir
    normal = directory / "normal.parquet"
    normal.write_bytes(normal.read_bytes() + b"\0")
    with pytest.raises(IndexError_, match="normal.parquet has sha256 .* changed or damaged"):
        _files(directory).read("normal.parquet")
    with pytest.raises(IndexError_, match="normal.parquet has sha256"):
        _files(directory).check_file("normal.parquet")
    assert _files(directory, verify=False).read("normal.parquet").endswith(b"\0")
    shard = directory / "shard-00001-of-00002.faiss"
    shard.write_bytes(shard.read_bytes()[:-4])  # truncated: the header no longer fits
    with pytest.raises(IndexError_, match="shard-00001-of-00002.faiss is corrupt or truncated"):
        _files(directory).read_flat("shard-00001-of-00002.faiss")
    shard.unlink()
    with pytest.raises(IndexError_, match="shard-00001-of-00002.faiss listed in the manifest "
                                          "is missing"):
        _files(directory).check_present()
