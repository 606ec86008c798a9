"""What every index kind provides (flat, kmeans, ivf, hnsw; registered in
dn2ops.index.kinds): build its files, grow them by added rows (``--add``), load them into a
searcher, and what the manifest and the log record of it.

A kind is chosen once: from the IndexConfig when building, from the manifest when
loading or adding. The code around it (dn2ops.index.build, .add, .search) never asks
which kind it holds.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol

import faiss
import numpy as np
import pyarrow as pa

from dn2ops.config import IndexConfig
from dn2ops.index.files import IndexDir
from dn2ops.index.reference import Scorer

LOG = logging.getLogger("dn2")


@dataclasses.dataclass
class Source:
    """The kept normal rows a build reads: ``chunks()`` yields them transformed, in
    blocks of at most dn2ops.index.build.CHUNK_ROWS rows (``kept_per_shard``: the kept
    rows of each feature shard); ``ref_ids`` are the kept rows
    of the normal reference's sample (None: all; dn2ops.index.build scores the sample's
    removed rows)."""

    chunks: Callable[[], Iterator[np.ndarray]]
    n: int
    dim: int
    kept_per_shard: list[int]
    ref_ids: np.ndarray | None


@dataclasses.dataclass
class Built:
    """One kind's files (name -> sha256), its reference scores (n,) and distances
    (n, k') of the kept rows (NaN: not in the reference), the ``scorer`` that gave them
    (it scores the removed rows too), and what the manifest records of it: ``n_flat``
    flat shards, ``info`` under the kind's key."""

    checksums: dict[str, str]
    ref: np.ndarray
    ref_d: np.ndarray
    scorer: Scorer
    n_flat: int = 0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Searcher(Protocol):
    """A loaded index of some kind: transformed features (nq, dim) -> scores (nq,) float64
    (higher = more anomalous), neighbour distances (nq, k') and ids (nq, k')."""

    def search(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, D, I) of the queries xq (nq, dim) float32."""


class NeighbourSearcher(abc.ABC):
    """A searcher whose score is the mean distance to the k nearest normal rows."""

    k: int

    @abc.abstractmethod
    def neighbours(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``D`` float32 (nq, k) Euclidean distances, ascending, ``I`` int64 (nq, k) ids."""

    def search(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        D, I = self.neighbours(xq)
        return D.mean(axis=1, dtype=np.float64), D, I


class Growing(Protocol):
    """An ``--add`` under way (dn2ops.index.add): the parent index, the added rows, and
    the new index's staged files, as a kind's ``grow`` uses them."""

    parent: dict[str, Any]  # the parent's manifest
    parent_dir: IndexDir
    normal: pa.Table  # the parent's normal.parquet
    k: int
    n_old: int  # the parent's kept rows
    m: int  # the added rows
    n: int  # n_old + m
    per_shard: list[int]  # the added rows, per feature shard
    retrain: bool
    reference_sample: int | None  # the reference's sample size (None: every row)
    device: str
    seed: int
    fs: Any
    stage: str
    files: dict[str, str]  # the staged files: name -> sha256
    flat_names: list[str]  # the staged flat shards (all of them), once written
    n_parent_shards: int  # the first of flat_names, copied from the parent

    def new_chunks(self) -> Iterator[np.ndarray]:
        """The added rows, transformed as the parent's were."""

    def union(self) -> Iterator[np.ndarray]:
        """Every row of the new index, in id order."""

    def copy(self, name: str, dst: str) -> None:
        """Copies a parent file into the staging folder, checking its sha256."""

    def write(self, name: str, index: faiss.Index) -> None:
        """Writes ``index`` into the staging folder as ``name``."""

    def read_parent(self, name: str) -> faiss.Index:
        """A parent index file, checked, holding the parent's n_old rows."""

    def recall(self, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
               effort: int, key: str, before: dict[str, Any]) -> dict[str, Any]:
        """recall@k of ``search`` at the parent's ``effort``, on a sample of the union."""


class IndexKind(abc.ABC):
    """One kind of index. ``key``: the manifest key of what it records of itself (None:
    nothing); ``how``: how its normal reference is scored (the manifest's reference.how
    starts with it); ``neighbours``: whether a score is a mean over k neighbours (else
    one distance, and no neighbours are reported)."""

    name: ClassVar[str]
    key: ClassVar[str | None] = None
    how: ClassVar[str]
    neighbours: ClassVar[bool] = True

    @abc.abstractmethod
    def wanted(self, config: IndexConfig) -> bool:
        """Whether ``config`` asks for this kind."""

    def recorded(self, manifest: dict[str, Any]) -> bool:
        """Whether the index of ``manifest`` is of this kind: by default, its manifest
        holds this kind's entry."""
        return bool(self.key and manifest.get(self.key))

    @abc.abstractmethod
    def build(self, fs, stage: str, src: Source, config: IndexConfig, device: str) -> Built:
        """Writes the kind's files of the rows ``src`` into ``stage``; scores the reference."""

    @abc.abstractmethod
    def grow(self, g: Growing) -> tuple[Scorer, dict[str, Any]]:
        """Stages the parent's files grown by the added rows. Returns the reference's
        scorer over the new index and the manifest entries that change."""

    @abc.abstractmethod
    def load(self, files: IndexDir, *, device: str, stream_shards: bool) -> Searcher:
        """The searcher of a committed index (``device``: 'cpu' or 'cuda', resolved)."""

    def width(self, k: int) -> int:
        """Distances per reference row (normal.parquet's loo_distances)."""
        return k if self.neighbours else 1

    def min_kept(self, config: IndexConfig) -> int:
        """Rows --clean-fraction must leave (as DN2Scorer)."""
        return config.k + 1

    def reference_reusable(self, retrain: bool) -> bool:
        """Whether ``--add`` may keep the parent's reference distances."""
        return True

    def check_output(self, config: IndexConfig, fs) -> None:
        """Refuses an output filesystem ``fs`` this kind cannot build on (by default, none)."""
        return None

    def check_addable(self, manifest: dict[str, Any], index_dir: str) -> None:
        """Refuses a parent index this kind cannot grow (by default, none)."""
        return None

    def log_built(self, manifest: dict[str, Any], k: int) -> None:
        """Logs what a user should know of a new index of this kind (by default, nothing
        beyond what every index logs)."""
        return None


class ApproximateKind(IndexKind):
    """A kind whose neighbours are approximate, its search effort (``effort``: nprobe,
    ef_search) tuned for recall@k; the manifest records the recall."""

    effort: ClassVar[str]

    def log_built(self, manifest: dict[str, Any], k: int) -> None:
        info = manifest[self.key]
        recall, mode = info["recall"], self.key.upper()
        LOG.info("%s: %s %s, recall@%s %.3f (approximate scores)", mode, self.effort,
                 info[self.effort], k, recall["recall_at_k"])
        if not recall["target_reached"]:
            LOG.warning("%s recall@%s %.3f is below the target %.3f even at %s %s: scores "
                        "are often above the exact ones; use exact shards or another "
                        "index", mode, k, recall["recall_at_k"], recall["target"],
                        self.effort, info[self.effort])
