"""Scoring stage: feature rows -> ranked anomaly rows.

Rows are scored in batches against the index (loaded once per worker process
and shared between its threads), then ranked against the sorted scores of
the whole partition (a side input of n floats): rank = 1 + the number of
strictly higher scores, so ties share the better rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.utils import shared

from dn2ops.index import LoadedIndex
from dn2ops.knn import set_faiss_threads

FEATURE_COLUMNS = ("uri", "sha256", "backbone", "dim", "embedding")


def anomaly_schema(extra_columns: Sequence[str] = ()) -> pa.Schema:
    fields = [("uri", pa.string()), ("score", pa.float64()), ("rank", pa.int64()),
              ("percentile", pa.float64()), ("neighbor_uris", pa.list_(pa.string())),
              ("neighbor_distances", pa.list_(pa.float64())), ("partition", pa.string()),
              ("backbone", pa.string()), ("index_id", pa.string()), ("sha256", pa.string())]
    return pa.schema(fields + [(c, pa.string()) for c in extra_columns])


def score_batch(rows: Sequence[dict[str, Any]], index: LoadedIndex,
                partition: str) -> list[dict[str, Any]]:
    """Feature rows -> unranked anomaly rows (``rank`` still None)."""
    xq = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
    scores, D, I = index.search(xq)
    pct = index.percentile(scores)
    out = []
    for r, s, p, d, i in zip(rows, scores, pct, D, I, strict=True):
        extras = {k: v for k, v in r.items() if k not in FEATURE_COLUMNS}
        out.append({"uri": r["uri"], "score": float(s), "rank": None, "percentile": float(p),
                    "neighbor_uris": [index.uris[j] for j in i],
                    "neighbor_distances": [float(x) for x in d], "partition": partition,
                    "backbone": index.manifest["backbone"], "index_id": index.index_id,
                    "sha256": r["sha256"], **extras})
    return out


def rank_of(score: float, sorted_scores: np.ndarray) -> int:
    """1 + the number of scores strictly greater than ``score`` (ties share a rank)."""
    return int(len(sorted_scores) - np.searchsorted(sorted_scores, score, side="right") + 1)


class _ScoreDoFn(beam.DoFn):
    def __init__(self, index_dir: str, partition: str, faiss_threads: int,
                 index_options: dict[str, Any] | None = None):
        self.index_dir = index_dir
        self.partition = partition
        self.faiss_threads = faiss_threads
        self.index_options = index_options or {}  # LoadedIndex(stream_shards=, device=)
        self._shared = shared.Shared()

    def setup(self):
        # faiss's OpenMP pool next to torch's oversubscribes the worker's cores.
        set_faiss_threads(self.faiss_threads)
        self.index = self._shared.acquire(
            lambda: _Holder(LoadedIndex(self.index_dir, **self.index_options)))

    def process(self, batch: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        yield from score_batch(batch, self.index.value, self.partition)


class _Holder:
    """shared.Shared needs a weak-referenceable object."""

    def __init__(self, value):
        self.value = value


def _sorted(scores: list[float]) -> np.ndarray:
    return np.sort(np.asarray(scores, dtype=np.float64))


class ScoreFeatures(beam.PTransform):
    """Feature rows -> ranked anomaly rows (see anomaly_schema)."""

    def __init__(self, index_dir: str, *, partition: str = "", batch_size: int = 256,
                 faiss_threads: int = 1, index_options: dict[str, Any] | None = None):
        super().__init__()
        self.index_dir = index_dir
        self.partition = partition
        self.batch_size = batch_size
        self.faiss_threads = faiss_threads
        self.index_options = index_options

    def expand(self, rows):
        scored = (rows
                  | "Batch" >> beam.BatchElements(min_batch_size=1,
                                                  max_batch_size=self.batch_size)
                  | "Score" >> beam.ParDo(_ScoreDoFn(self.index_dir, self.partition,
                                                     self.faiss_threads, self.index_options)))
        return scored | "Rank" >> RankByScore()


class RankByScore(beam.PTransform):
    """Rows with a ``score`` -> the same rows with ``rank`` (see rank_of), over the whole
    PCollection: its sorted scores (n floats) are a side input."""

    def expand(self, scored):
        sorted_scores = (scored
                         | "Scores" >> beam.Map(lambda r: r["score"])
                         | "All" >> beam.combiners.ToList()
                         | "Sort" >> beam.Map(_sorted))
        return scored | "Rank" >> beam.Map(
            lambda r, s: {**r, "rank": rank_of(r["score"], s)},
            s=beam.pvalue.AsSingleton(sorted_scores))
