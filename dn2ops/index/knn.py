"""Exact nearest-neighbour helpers on top of faiss, for DN2 scoring.

Conventions (shared by all of dn2):

* Inputs are float32 2-D arrays: queries ``xq`` (nq, d), database ``xb`` (nb, d).
* Outputs are ``D`` float32 (nq, k) and ``I`` int64 (nq, k), sorted by
  increasing distance per row.
* ``D`` holds plain Euclidean (L2) distances, NOT the squared distances that
  ``faiss.IndexFlatL2`` returns.

Why the exact re-ranking: for large batches faiss computes squared distances
as ``|x|^2 + |y|^2 - 2<x, y>`` with BLAS in float32.  With CNN features (all
non-negative, large norms) that cancels badly: exact duplicates come back at
distances like 0.5 instead of 0, and a point is not always its own nearest
neighbour.  We therefore (1) search around the database mean, which leaves L2
distances unchanged but shrinks the norms, and (2) recompute the distances of
the returned candidates directly from coordinate differences and re-sort.  The
candidate *set* can then only differ from the true one between points whose
distances agree to within float32 round-off.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import faiss
import numpy as np

__all__ = [
    "ExactShard",
    "FlatShard",
    "as_float32",
    "flat_vectors",
    "kmeans_centroids",
    "knn",
    "knn_leave_one_out",
    "knn_sharded",
    "set_faiss_threads",
]

# Elements of the (rows, k, d) difference tensor materialised at once when
# re-ranking; bounds the temporary memory to ~64 MiB of float32.
_RERANK_BLOCK_ELEMS = 1 << 24
# Query rows shifted and searched at once by FlatShard.search.
_QUERY_BLOCK = 16384


def as_float32(x: np.ndarray, *, name: str = "x") -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 array of shape (n, d).

    Raises ValueError if ``x`` is not 2-D, has no columns, is not real
    numeric, or contains NaN/inf (also after the cast: float64 values beyond
    the float32 range become inf).  No copy is made if ``x`` already
    qualifies.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n, d), got ndim={arr.ndim} "
            f"with shape {arr.shape}"
        )
    if arr.shape[1] == 0:
        raise ValueError(
            f"{name} must have at least one feature column, got shape {arr.shape}"
        )
    # Overflow to inf is reported by the finiteness check below instead.
    with np.errstate(over="ignore"):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(
            f"{name} contains NaN or infinite values (after casting to float32)"
        )
    return arr


def set_faiss_threads(n: int) -> None:
    """Cap the OpenMP threads faiss uses in this process.

    faiss and torch each bring an OpenMP runtime; pipeline workers running
    several bundles in parallel should cap both to avoid oversubscription.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of threads must be a positive integer, got {n!r}")
    faiss.omp_set_num_threads(int(n))


def _check_k(k: int, nb: int, what: str = "database vectors") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > nb:
        raise ValueError(f"k={k} is larger than the number of {what} ({nb})")
    return int(k)


def _check_dims(xq: np.ndarray, d: int, what: str = "xb") -> None:
    if xq.shape[1] != d:
        raise ValueError(
            f"xq has {xq.shape[1]} features but {what} has {d}; dimensions must match"
        )


def _flat_index(xb: np.ndarray) -> tuple[faiss.IndexFlatL2, np.ndarray]:
    """IndexFlatL2 over ``xb`` shifted by its mean; returns (index, shift (d,))."""
    # The mean is accumulated in float64 so the shift itself is accurate.
    shift = xb.mean(axis=0, dtype=np.float64).astype(np.float32)
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb - shift)
    return index, shift


def flat_vectors(index: faiss.Index) -> np.ndarray:
    """The vectors (ntotal, d) float32 of a flat index: a view into its memory, valid while
    the caller holds ``index`` (the proxy that owns the C++ object)."""
    flat = faiss.downcast_index(index)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


@runtime_checkable
class ExactShard(Protocol):
    """A database block searched exactly (FlatShard, dn2ops.index.gpu.GpuFlat): what
    knn_sharded searches as it is, rather than as an array or a faiss index."""

    @property
    def d(self) -> int:
        """The vectors' dimension."""

    def __len__(self) -> int:
        """The number of vectors nb."""

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN of xq (nq, d), k <= nb: ``D`` float32 (nq, k) ascending Euclidean
        distances, ``I`` int64 (nq, k) local ids."""


class FlatShard:
    """A database block held as one mean-shifted IndexFlatL2, for repeated exact searches.

    The index's own vectors, shifted by their mean, are the only copy kept:
    candidates come from faiss and are re-ranked with distances computed from
    coordinate differences in the same shifted frame (a shift leaves
    differences unchanged; an exact duplicate of a vector is still at 0).
    ``FlatShard(xb)`` copies ``xb``; ``FlatShard.adopt(index)`` shifts the
    vectors of a freshly read IndexFlatL2 in place (no copy at all).
    """

    def __init__(self, xb: np.ndarray):
        xb = as_float32(xb, name="xb")
        self.index, self.shift = _flat_index(xb)

    @classmethod
    def adopt(cls, index: faiss.Index) -> FlatShard:
        """Takes over ``index`` (an IndexFlatL2 nobody else uses): its vectors are shifted."""
        shard = cls.__new__(cls)
        xs = flat_vectors(index)
        shard.shift = (xs.mean(axis=0, dtype=np.float64).astype(np.float32) if len(xs)
                       else np.zeros(index.d, np.float32))
        xs -= shard.shift
        shard.index = index
        return shard

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN (k <= len(self)), re-ranked: ``D`` float32 (nq, k) ascending, ``I``
        int64 (nq, k). Queries go in blocks, so a shard's worth of them costs no copy."""
        D = np.empty((len(xq), k), np.float32)
        I = np.empty((len(xq), k), np.int64)
        xb = flat_vectors(self.index)
        for a in range(0, len(xq), _QUERY_BLOCK):
            xs_q = xq[a:a + _QUERY_BLOCK] - self.shift
            _, I[a:a + len(xs_q)] = self.index.search(xs_q, k)
            D[a:a + len(xs_q)] = exact_distances(xs_q, xb, I[a:a + len(xs_q)])
        order = np.argsort(D, axis=1, kind="stable")
        return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def exact_distances(xq: np.ndarray, xb: np.ndarray, I: np.ndarray) -> np.ndarray:
    """Euclidean distances (nq, k) float32 between xq[i] and xb[I[i, j]]."""
    nq, k = I.shape
    D = np.empty((nq, k), dtype=np.float32)
    rows = max(1, _RERANK_BLOCK_ELEMS // max(1, k * xb.shape[1]))
    for i0 in range(0, nq, rows):
        i1 = min(nq, i0 + rows)
        # Subtract first (exact for nearby points), then accumulate in float64.
        diff = xq[i0:i1, None, :] - xb[I[i0:i1]]
        D[i0:i1] = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff, dtype=np.float64))
    return D


def knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-nearest-neighbour search of ``xq`` (nq, d) in ``xb`` (nb, d).

    Returns ``D`` float32 (nq, k) Euclidean distances (ascending per row) and
    ``I`` int64 (nq, k) row indices into ``xb``.  Raises ValueError if
    ``k > nb`` or the dimensions differ.
    """
    xq = as_float32(xq, name="xq")
    xb = as_float32(xb, name="xb")
    _check_dims(xq, xb.shape[1])
    k = _check_k(k, xb.shape[0])
    return FlatShard(xb).search(xq, k)


def knn_sharded(
    xq: np.ndarray,
    shards: Iterable[np.ndarray | faiss.Index],
    k: int,
    offsets: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of ``xq`` (nq, d) over a database split into shards.

    ``shards`` may be a generator, so a database larger than memory can be
    streamed block by block.  Each shard is either a float32 array (nb_s, d)
    or a `FlatShard`, searched exactly with re-ranking as in `knn`, or a faiss index with
    METRIC_L2 (its squared distances are square-rooted; no re-ranking since
    the vectors are not at hand).  Global ids are ``offsets[s] + local id``;
    by default the offsets are the running total of shard sizes, so the
    result equals ``knn(xq, np.concatenate(shards), k)`` up to the order of
    tied neighbours.

    Returns ``D`` float32 (nq, k) Euclidean distances and ``I`` int64 (nq, k)
    global ids.  Raises ValueError if the shards hold fewer than ``k`` vectors
    in total.
    """
    xq = as_float32(xq, name="xq")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    nq = xq.shape[0]
    heap = faiss.ResultHeap(nq, k)
    running = 0
    s = -1
    # No enumerate, and the shard dropped once searched: a generator of shards (loaded
    # from files) then holds one in memory, not the last one while it loads the next.
    for shard, offset in _with_offsets(shards, offsets):
        s += 1
        found = _search_shard(xq, shard, k, s)
        del shard
        if found is None:
            continue
        D, I, nb = found
        # -1 marks "no result" in faiss; keep it rather than offsetting it.
        heap.add_result(D, np.where(I >= 0, I + (running if offset is None else offset), -1))
        running += nb
    if k > running:
        raise ValueError(
            f"k={k} is larger than the number of database vectors in all shards ({running})"
        )
    heap.finalize()
    return heap.D, heap.I


def _with_offsets(shards: Iterable[Any], offsets: Sequence[int] | None
                  ) -> Iterator[tuple[Any, int | None]]:
    """(shard, its offset) pairs; None offsets (running totals) without ``offsets``.
    Raises ValueError when ``offsets`` has fewer or more entries than there are shards."""
    if offsets is None:
        for shard in shards:
            yield shard, None
            del shard  # before the next is loaded (see knn_sharded)
        return
    offset_iter = iter(offsets)
    nshards = 0
    for shard in shards:
        nshards += 1
        try:
            offset = int(next(offset_iter))
        except StopIteration:
            raise ValueError(f"offsets has fewer entries than shards (no offset for shard "
                             f"{nshards - 1})") from None
        yield shard, offset
        del shard
    if next(offset_iter, None) is not None:
        raise ValueError(f"offsets has more entries than shards ({nshards})")


def _search_shard(xq: np.ndarray, shard: Any, k: int, s: int
                  ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(D, I, nb) of one shard of knn_sharded (local ids), None when it is empty.

    A shard with its own exact ``search(xq, k)`` (FlatShard, dn2ops.index.gpu.GpuFlat) is
    searched as it is; a faiss index gives square-rooted L2 distances; an array is
    wrapped in a FlatShard for this search.
    """
    if isinstance(shard, faiss.Index):
        if shard.metric_type != faiss.METRIC_L2:
            raise ValueError(f"shard {s}: only METRIC_L2 faiss indexes are supported")
        _check_dims(xq, shard.d, what=f"shard {s}")
        nb = int(shard.ntotal)
        if nb == 0:
            return None
        D2, I = shard.search(xq, min(k, nb))
        return np.sqrt(np.maximum(D2, 0)), I, nb
    if not isinstance(shard, ExactShard):
        xb = as_float32(shard, name=f"shard {s}")
        _check_dims(xq, xb.shape[1], what=f"shard {s}")
        if len(xb) == 0:
            return None
        shard = FlatShard(xb)
    _check_dims(xq, shard.d, what=f"shard {s}")
    nb = len(shard)
    if nb == 0:
        return None
    D, I = shard.search(xq, min(k, nb))
    return D, I, nb


def knn_leave_one_out(xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``xb`` (nb, d), its k nearest OTHER rows.

    Searches k+1 neighbours and removes the query's own id.  If the own id is
    not among the k+1 (only possible with more than k exact duplicates or
    ties), the last column is dropped instead, so a point is never its own
    neighbour.  An exact duplicate under another id is a legitimate neighbour
    at distance 0.

    Returns ``D`` float32 (nb, k) Euclidean distances and ``I`` int64 (nb, k).
    Raises ValueError unless ``k <= nb - 1``.
    """
    xb = as_float32(xb, name="xb")
    nb = xb.shape[0]
    k = _check_k(k, nb - 1, what="other points (n - 1)")
    D, I = FlatShard(xb).search(xb, k + 1)
    is_self = I == np.arange(nb, dtype=np.int64)[:, None]
    # Rows without their own id lose their last (farthest) column instead.
    drop = is_self.copy()
    drop[~is_self.any(axis=1), -1] = True
    # A row can match its own id at most once, so exactly one entry per row
    # is dropped and the boolean mask reshapes cleanly to (nb, k).
    keep = ~drop
    return D[keep].reshape(nb, k), I[keep].reshape(nb, k)


def kmeans_centroids(
    xb: np.ndarray,
    n_centroids: int,
    *,
    niter: int = 20,
    seed: int = 1234,
    max_points_per_centroid: int | None = None,
) -> np.ndarray:
    """K-means centroids (n_centroids, d) float32 of ``xb`` (nb, d) with faiss.Kmeans.

    ``max_points_per_centroid=None`` trains on all points.  (faiss's default
    of 256 silently subsamples to 256 * n_centroids points, so e.g. the
    single centroid of 1000 points would not be their mean.)

    When ``n_centroids == nb`` a copy of ``xb`` is returned: faiss does the
    same (it copies the points verbatim when nx == k), and we short-cut it so
    that distance-to-nearest-centroid equals exact 1-NN distance by
    construction rather than by relying on that faiss detail.
    Raises ValueError unless ``1 <= n_centroids <= nb``.
    """
    xb = as_float32(xb, name="xb")
    nb, d = xb.shape
    n_centroids = _check_k(n_centroids, nb, what="points to cluster")
    if n_centroids == nb:
        return xb.copy()
    if max_points_per_centroid is None:
        max_points_per_centroid = nb
    km = faiss.Kmeans(
        d,
        n_centroids,
        niter=int(niter),
        seed=int(seed),
        max_points_per_centroid=int(max_points_per_centroid),
        # Only controls faiss's "please provide at least ... points" stderr
        # warning; it has no effect on the result.
        min_points_per_centroid=1,
        verbose=False,
    )
    # Cluster around the mean for the same float32 cancellation reason as in
    # the search (assignment uses IndexFlatL2), then shift back.
    shift = xb.mean(axis=0, dtype=np.float64).astype(np.float32)
    km.train(xb - shift)
    return np.ascontiguousarray(km.centroids + shift, dtype=np.float32)
