"""Index files: faiss indexes written and read block by block through fsspec, each
checked against the sha256 the manifest records (dn2ops.index's layout); `IndexDir`: a
committed INDEX_DIR's files, read as its manifest lists them."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np

from dn2ops.errors import UserError
from dn2ops.index.knn import flat_vectors
from dn2ops.io import outputs

KIND = "index"


class IndexError_(UserError, ValueError):
    """The index directory is missing, corrupt or does not match its manifest."""


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.faiss"


def flat_of(xb: np.ndarray) -> faiss.IndexFlatL2:
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    return index


# How faiss serializes an IndexFlatL2: fourcc, d, ntotal, two unused int64, is_trained,
# metric type, then the vectors' length in floats (and the floats).
_FLAT_HEADER = struct.Struct("<4siqqq?iQ")


def mismatch(name: str, got: str, expected: str) -> IndexError_:
    return IndexError_(f"index file {name} has sha256 {got[:12]}..., the manifest says "
                       f"{expected[:12]}...: the file was changed or damaged; rebuild the index")


def corrupt(name: str, e: Exception) -> IndexError_:
    return IndexError_(f"index file {name} is corrupt or truncated: "
                       f"{str(e).splitlines()[0]}; rebuild the index")


HASH_BLOCK = 1 << 24


def write_index(fs, path: str, index: faiss.Index) -> str:
    """Writes ``index`` to ``path`` through faiss's callback writer, block by block (no
    serialized copy in memory, any fsspec filesystem); returns the file's sha256."""
    h = hashlib.sha256()
    with fs.open(path, "wb") as f:
        def write(block: bytes) -> int:
            h.update(block)
            f.write(block)
            return len(block)

        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    return h.hexdigest()


def read_index(fs, path: str, name: str, expected_sha256: str | None = None) -> faiss.Index:
    """Reads a faiss index file block by block (no bytes copy in memory), hashing what it
    reads; raises IndexError_ if it is corrupt or its sha256 is not ``expected_sha256``.

    The hash is checked after faiss has parsed the file, so callers bound what a damaged
    file can make faiss allocate first (`check_flat_header`) or check the hash before
    (`file_sha256`).
    """
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        def read(size: int) -> bytes:
            block = f.read(size)
            h.update(block)
            return block

        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(read))
        except RuntimeError as e:  # faiss raises RuntimeError on corrupt bytes
            raise corrupt(name, e) from None
        while block := f.read(HASH_BLOCK):  # trailing bytes count too
            h.update(block)
    if expected_sha256 is not None and h.hexdigest() != expected_sha256:
        raise mismatch(name, h.hexdigest(), expected_sha256)
    return index


def check_flat_header(fs, path: str, name: str, dim: int) -> None:
    """A flat shard file's header agrees with its size and ``dim`` (so truncation shows
    without loading it, and reading it allocates no more than the file holds)."""
    with fs.open(path, "rb") as f:
        head = f.read(_FLAT_HEADER.size)
    size = fs.size(path)
    if len(head) == _FLAT_HEADER.size:
        fourcc, d, ntotal, _, _, _, _, floats = _FLAT_HEADER.unpack(head)
        if (fourcc == b"IxF2" and d == dim and floats == ntotal * d
                and size == _FLAT_HEADER.size + 4 * floats):
            return
        what = f"its header says {fourcc!r}, d={d}, {ntotal} vectors"
    else:
        what = "it is shorter than a faiss header"
    raise IndexError_(f"index file {name} is corrupt or truncated: {size} bytes, {what} "
                      f"(the manifest says d={dim}); rebuild the index")


def put(fs, path: str, blob: bytes) -> str:
    """Writes ``blob`` to ``path``; returns its sha256."""
    fs.pipe_file(path, blob)
    return hashlib.sha256(blob).hexdigest()


def file_sha256(fs, path: str) -> str:
    """sha256 of a file, read in 16 MiB blocks (index files can exceed memory)."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class IndexDir:
    """A committed INDEX_DIR's files, each checked against the sha256 its manifest records
    as it is read (``verify=False``: not checked). What an index kind loads through
    (dn2ops.index.kinds)."""

    def __init__(self, directory: str, manifest: dict[str, Any], *, verify: bool = True):
        self.directory, self.manifest, self.verify = directory, manifest, verify
        self.fs, self.path = outputs.fs_and_path(directory)
        self.shard_names = sorted(n for n in manifest["files"] if n.startswith("shard-"))

    def join(self, name: str) -> str:
        return outputs.join(self.path, name)

    def check_present(self) -> None:
        """Every file the manifest lists is there."""
        for name in self.manifest["files"]:
            if not self.fs.exists(self.join(name)):
                raise IndexError_(f"index file {name} listed in the manifest is missing "
                                  f"from {self.directory}")

    def read(self, name: str) -> bytes:
        """The bytes of a small index file, checked against the manifest's sha256."""
        data = self.fs.cat_file(self.join(name))
        if self.verify:
            got = hashlib.sha256(data).hexdigest()
            if got != self.manifest["files"][name]:
                raise mismatch(name, got, self.manifest["files"][name])
        return data

    def check_file(self, name: str) -> None:
        """Checks one file's sha256 reading it in blocks (for files larger than memory)."""
        got = file_sha256(self.fs, self.join(name))
        if got != self.manifest["files"][name]:
            raise mismatch(name, got, self.manifest["files"][name])

    def check_flat(self, name: str) -> None:
        check_flat_header(self.fs, self.join(name), name, self.manifest["dim"])

    def read_flat(self, name: str) -> faiss.Index:
        """One flat index file read into its faiss index (header checked first, sha256
        checked while reading)."""
        self.check_flat(name)
        return read_index(self.fs, self.join(name), name,
                          self.manifest["files"][name] if self.verify else None)

    def read_checked(self, name: str) -> faiss.Index:
        """An index file of any kind, its sha256 checked (in blocks) before faiss parses it."""
        if self.verify:
            self.check_file(name)
        return read_index(self.fs, self.join(name), name)

    def iter_shards(self) -> Iterator[np.ndarray]:
        """The flat shards' vectors (n_s, dim) float32 as stored, read (and checked) one
        at a time."""
        for name in self.shard_names:
            index = self.read_flat(name)
            xb = flat_vectors(index).copy()
            del index
            yield xb
