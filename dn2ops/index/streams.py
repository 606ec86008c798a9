"""Helpers for building indexes from a stream of vector chunks, never all at once.

A *chunk stream* is an iterator of float32 arrays (n_i, d) whose rows, in
order, are the database vectors with global ids 0, 1, 2, ... It can be read
several times by calling the function that makes it again (each call reads
the feature shards from storage anew).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def rechunk(chunks: Iterable[np.ndarray], sizes: Sequence[int]) -> Iterator[np.ndarray]:
    """Regroups the rows of ``chunks`` into arrays of exactly ``sizes`` rows, in order
    (`split`'s parts, joined; an empty part is a (0, 0) array).

    Holds at most one output array plus one input chunk. Raises ValueError if
    the chunks hold fewer or more rows than ``sum(sizes)``.
    """
    for pieces in split(chunks, sizes):
        parts = list(pieces)
        yield (parts[0] if len(parts) == 1 else np.concatenate(parts) if parts
               else np.zeros((0, 0), np.float32))


def split(chunks: Iterable[np.ndarray], sizes: Sequence[int]
          ) -> Iterator[Iterator[np.ndarray]]:
    """The rows of ``chunks`` cut into consecutive parts of ``sizes`` rows, each part an
    iterator of pieces (views of the chunks): ``rechunk`` without joining the pieces, so a
    consumer that adds them one at a time (a faiss index) holds no copy of a whole part.
    A part not read to its end is skipped when the next is asked for. Raises ValueError
    if the chunks hold fewer or more rows than ``sum(sizes)``."""
    source = iter(chunks)
    rest = np.zeros((0, 0), np.float32)

    def part(want: int) -> Iterator[np.ndarray]:
        nonlocal rest
        while want:
            if not len(rest):
                rest = next(source, None)
                if rest is None:
                    raise ValueError("the chunks hold fewer rows than the sizes ask for")
                continue
            piece, rest = rest[:want], rest[want:]
            want -= len(piece)
            yield piece

    for want in sizes:
        pieces = part(int(want))
        yield pieces
        for _ in pieces:  # what the consumer left of this part
            pass
    if len(rest) or any(len(c) for c in source):
        raise ValueError("the chunks hold more rows than the sizes ask for")


class Tap:
    """Passes a chunk stream through unchanged while copying out the rows of some id sets,
    so samples are gathered during a pass that is made anyway.

    ``Tap(chunks, ids_a, ids_b)``: iterate it, then ``rows(0)`` is (len(ids_a), d).
    """

    def __init__(self, chunks: Iterable[np.ndarray], *id_sets: np.ndarray | None):
        self.chunks = chunks
        self.id_sets = [None if ids is None else np.asarray(ids, dtype=np.int64)
                        for ids in id_sets]
        self.parts: list[list[np.ndarray]] = [[] for _ in id_sets]
        self.seen = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self.chunks:
            for ids, parts in zip(self.id_sets, self.parts, strict=True):
                if ids is None:
                    continue
                lo, hi = np.searchsorted(ids, [self.seen, self.seen + len(chunk)])
                if hi > lo:
                    parts.append(chunk[ids[lo:hi] - self.seen].copy())
            self.seen += len(chunk)
            yield chunk

    def rows(self, i: int) -> np.ndarray | None:
        ids = self.id_sets[i]
        if ids is None:
            return None
        out = (np.concatenate(self.parts[i]) if self.parts[i]
               else np.zeros((0, 0), np.float32))
        if len(out) != len(ids):
            raise ValueError(f"asked for {len(ids)} rows, the stream has {self.seen}")
        return out


def gather_rows(chunks: Iterable[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The rows with global ids ``ids`` (sorted, unique) of a chunk stream, (len(ids), d)."""
    tap = Tap(chunks, ids)
    for _ in tap:
        pass
    return tap.rows(0)


def sample_ids(n: int, size: int | None, seed: int) -> np.ndarray:
    """Sorted ids of a uniform sample of ``size`` of ``n`` rows (all of them if size is None)."""
    if size is None or size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def drop_self(D: np.ndarray, I: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out: removes each query's own id from its k+1 neighbours -> (nq, k).

    As dn2ops.index.knn.knn_leave_one_out: a row whose own id is not among its
    neighbours (more than k exact duplicates) loses its last column instead.
    """
    nq, k1 = I.shape
    is_self = I == np.asarray(ids, dtype=np.int64)[:, None]
    drop = is_self.copy()
    drop[~is_self.any(axis=1), -1] = True
    # Duplicated ids cannot occur (ids are unique), so one entry per row goes.
    keep = ~drop
    return D[keep].reshape(nq, k1 - 1), I[keep].reshape(nq, k1 - 1)


def percentile_error(sample: int | None, confidence: float = 0.95) -> float:
    """Percentile points within which a reference of ``sample`` scores gives every percentile.

    The Dvoretzky-Kiefer-Wolfowitz bound: with probability ``confidence`` the
    sample's empirical CDF is within eps = sqrt(ln(2 / (1 - confidence)) / (2 m))
    of the whole set's at every score at once. 0.0 when every image is scored.
    """
    if sample is None:
        return 0.0
    return 100.0 * math.sqrt(math.log(2.0 / (1.0 - confidence)) / (2.0 * sample))
