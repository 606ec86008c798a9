"""Flat shards: IndexFlatL2 files of a chunk stream's rows, written one at a time as the
rows stream by, and loaded back one at a time for exact search."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import faiss
import numpy as np

from dn2ops.index import streams
from dn2ops.index.files import flat_of, read_index, shard_name, write_index
from dn2ops.index.knn import FlatShard, flat_vectors
from dn2ops.io import outputs


def shard_sizes(n: int, shards: int | None, per_feature_shard: list[int]) -> list[int]:
    """Rows per index shard: ``shards`` equal parts, or (None) one per non-empty feature shard."""
    if shards is None:
        return [c for c in per_feature_shard if c > 0]
    bounds = np.linspace(0, n, min(shards, n) + 1).astype(int)
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def reserved_flat(d: int, n: int) -> faiss.IndexFlatL2:
    """An empty IndexFlatL2 whose storage holds n rows already: adding up to n rows fills
    it in place. Left to itself the storage (a std::vector) doubles as rows are added, and
    each doubling holds the old and the new copy at once: up to twice a shard at its peak.
    (Sized, then emptied: a vector keeps its capacity when it shrinks.)"""
    index = faiss.IndexFlatL2(d)
    index.codes.resize(n * index.code_size)
    index.codes.resize(0)
    return index


def write_flat_shards(fs, directory: str, chunks: Iterable[np.ndarray],
                      sizes: list[int]) -> dict[str, str]:
    """Writes shard-SSSSS-of-NNNNN.faiss files of ``sizes`` rows each; returns name -> sha256."""
    checksums = {}
    fs.makedirs(directory, exist_ok=True)
    for i, (size, pieces) in enumerate(zip(sizes, streams.split(chunks, sizes), strict=True)):
        name = shard_name(i, len(sizes))
        # The index grows a chunk at a time into storage sized for the shard: it and one
        # chunk are the build's peak (the file is written in blocks), not the shard's rows
        # joined and then copied into it.
        index = None
        for xb in pieces:
            if index is None:
                index = reserved_flat(xb.shape[1], int(size))
            index.add(xb)
        checksums[name] = write_index(fs, outputs.join(directory, name),
                                      index if index is not None
                                      else flat_of(np.zeros((0, 0), np.float32)))
        del index
    return checksums


def shard_loader(fs, directory: str, names: list[str], device: str
                 ) -> Callable[[], Iterator[FlatShard | np.ndarray]]:
    """Loads the flat shards one at a time: a FlatShard on the CPU (the read index, shifted
    in place: one copy in memory), the vectors for dn2ops.index.gpu."""
    def load() -> Iterator[FlatShard | np.ndarray]:
        for name in names:
            index = read_index(fs, outputs.join(directory, name), name)
            if device == "cuda":
                yield flat_vectors(index)  # the generator holds the index meanwhile
            else:
                yield FlatShard.adopt(index)
            del index
    return load
