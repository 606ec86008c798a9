"""The normal reference: the normal rows' own scores, computed while an index is built
or grown (normal.parquet's ``loo_score`` and ``loo_distances``), from which scoring
takes percentiles and p-values (dn2ops.index.calibration).

A score function ``score(xq, ids)`` gives the neighbour distances (m, k') of query rows
xq (m, d) whose global ids are ``ids``: leave-one-out over exact flat shards
(`flat_loo`) or an approximate index (`approx_loo`), or the distance to the nearest
K-means centre (`nearest_centre`; dn2ops.index.kinds.kmeans keeps it out of sample). A
row outside the index (removed by cleaning) has the id OUTSIDE: it has no self to leave
out, so its score is a new image's. `reference_scores` averages them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import faiss
import numpy as np
import pyarrow as pa

from dn2ops.index import gpu, streams
from dn2ops.index.knn import FlatShard, knn, knn_sharded
from dn2ops.io import progress as progress_log

ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Query rows searched at once when computing reference scores of a sample.
_QUERY_BLOCK = 8192
# The id of a query row that is not in the index (a normal row removed by cleaning).
OUTSIDE = -1


@dataclasses.dataclass(frozen=True)
class Scorer:
    """How an index kind scores its reference rows: ``score(xq, ids)`` (a ScoreFn; NaN
    rows: not in the reference), ``how`` (the manifest's reference.how) and ``share``, the
    share of the kept rows that may enter the reference (K-means: those out of the
    centres' training sample); rows removed by cleaning enter at the same rate, so the
    reference stays a uniform sample of every normal row."""

    score: ScoreFn
    how: str
    share: float = 1.0


def outside_scores(score: ScoreFn, chunks: Iterable[np.ndarray], m: int, width: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Scores (m,) float64 and distances (m, width) float32 of the m rows ``chunks`` yields,
    rows not in the index (id OUTSIDE): each scored as a new image would be."""
    out, kept = np.full(m, np.nan), np.full((m, width), np.nan, np.float32)
    at = 0
    for x in chunks:
        for a in range(0, len(x), _QUERY_BLOCK):
            xb = x[a:a + _QUERY_BLOCK]
            D = score(xb, np.full(len(xb), OUTSIDE, np.int64))
            out[at:at + len(xb)], kept[at:at + len(xb)] = D.mean(axis=1, dtype=np.float64), D
            at += len(xb)
    if at != m:
        raise ValueError(f"asked to score {m} rows outside the index, got {at}")
    return out, kept


def reference_scores(score: ScoreFn, chunks: Callable[[], Iterator[np.ndarray]], n: int,
                     ids: np.ndarray | None, xq: np.ndarray | None = None,
                     progress: progress_log.Progress | None = None, keep: int = 0
                     ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Scores (n,) float64 of the rows ``ids`` (all when None; NaN elsewhere).

    ``score(xq, ids)`` gives the neighbour distances (m, k') of query rows xq (m, d) whose
    global ids are ``ids``; a row's score is their mean. ``xq``: the rows ``ids``, when
    already gathered (else read from ``chunks()``). ``keep`` = k': also return the
    distances, (n, k') float32 (NaN rows elsewhere), which ``--add`` merges with the
    distances to the added images (dn2ops.index.add).
    """
    out = np.full(n, np.nan)
    kept = np.full((n, keep), np.nan, np.float32) if keep else None

    def put(at: np.ndarray | slice, xb: np.ndarray, row_ids: np.ndarray) -> None:
        D = score(xb, row_ids)
        out[at] = D.mean(axis=1, dtype=np.float64)
        if kept is not None:
            kept[at] = D

    if ids is None:
        start = 0
        for x in chunks():
            for a in range(0, len(x), _QUERY_BLOCK):
                xb = x[a:a + _QUERY_BLOCK]
                at = start + a
                put(slice(at, at + len(xb)), xb, np.arange(at, at + len(xb)))
                if progress is not None:
                    progress.update(at + len(xb))
            start += len(x)
    else:
        if xq is None:
            xq = streams.gather_rows(chunks(), ids)
        for a in range(0, len(ids), _QUERY_BLOCK):
            put(ids[a:a + _QUERY_BLOCK], xq[a:a + _QUERY_BLOCK], ids[a:a + _QUERY_BLOCK])
    return out if kept is None else (out, kept)


def flat_loo(load: Callable[[], Iterator[FlatShard | np.ndarray]], k: int, device: str
             ) -> ScoreFn:
    """Leave-one-out neighbour distances (m, k) of query rows against the shards ``load()``
    yields: exact (rows OUTSIDE the index: their k nearest)."""
    def score(xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        search = gpu.knn_sharded_gpu if device == "cuda" else knn_sharded
        D, I = search(xq, load(), k + 1)
        return streams.drop_self(D, I, ids)[0]
    return score


def approx_loo(search: Callable[..., tuple[np.ndarray, np.ndarray]], index: faiss.Index,
               k: int) -> ScoreFn:
    """Leave-one-out neighbour distances (m, k) of query rows with an approximate index's
    ``search``."""
    def score(xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        D, I = search(index, xq, k + 1)
        return streams.drop_self(D, I, ids)[0]
    return score


def nearest_centre(centroids: np.ndarray) -> ScoreFn:
    """The distance (m, 1) to the nearest centre (K-means; whatever the ids)."""
    def score(xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return knn(xq, centroids, 1)[0]
    return score


def distances_column(D: np.ndarray) -> pa.Array:
    """Reference distances (n, k') -> list<float32> column, null where a row was not
    sampled (normal.parquet ``loo_distances``)."""
    n, k = D.shape
    values = pa.array(np.nan_to_num(D).ravel(), pa.float32())
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    mask = pa.array(np.isnan(D).any(axis=1) if k else np.ones(n, bool))
    return pa.ListArray.from_arrays(offsets, values, mask=mask)
