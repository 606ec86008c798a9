"""Index kinds, the faiss way (an index_factory string maps to one class): flat (exact
shards, the default), kmeans (``--kmeans C``), ivf (``--ivf NLIST``) and hnsw
(``--hnsw M``), each an IndexKind (dn2ops.index.kinds.base) that builds, grows and loads
its files. Registered once, here; a kind is chosen once, from the IndexConfig when
building (`for_config`) or from the manifest when loading or adding (`for_manifest`).
"""

from __future__ import annotations

from typing import Any

from dn2ops.config import IndexConfig
from dn2ops.index.kinds.base import Built, Growing, IndexKind, Searcher, Source
from dn2ops.index.kinds.flat import Flat
from dn2ops.index.kinds.hnsw import Hnsw
from dn2ops.index.kinds.ivf import Ivf
from dn2ops.index.kinds.kmeans import KMEANS_SAMPLE_PER_CENTROID, Kmeans

__all__ = ["KINDS", "KMEANS_SAMPLE_PER_CENTROID", "Built", "Growing", "IndexKind", "Searcher",
           "Source", "for_config", "for_manifest", "manifest_entries"]

# Asked in this order; flat, which takes whatever the others do not, last. The manifest
# records each keyed kind's entry in this order too.
KINDS: tuple[IndexKind, ...] = (Ivf(), Hnsw(), Kmeans(), Flat())


def for_config(config: IndexConfig) -> IndexKind:
    """The kind an IndexConfig asks for."""
    return next(kind for kind in KINDS if kind.wanted(config))


def for_manifest(manifest: dict[str, Any]) -> IndexKind:
    """The kind of a built index, from its manifest."""
    return next(kind for kind in KINDS if kind.recorded(manifest))


def manifest_entries(info: dict[str, Any]) -> dict[str, Any]:
    """Every keyed kind's manifest entry: the built kind's from ``info``, None for the rest."""
    return {kind.key: info.get(kind.key) for kind in KINDS if kind.key}
