"""A committed INDEX_DIR loaded for scoring: LoadedIndex.search through the searcher of the
index's kind (flat shards held or streamed, K-means centres, IVF, HNSW; see
dn2ops.index.kinds), on the CPU or a GPU."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dn2ops import transforms
from dn2ops.index import gpu, kinds
from dn2ops.index.calibration import Reference, read_normal, reference_of
from dn2ops.index.files import KIND, IndexDir
from dn2ops.index.knn import as_float32
from dn2ops.io import features, outputs


class LoadedIndex:
    """A verified index directory, ready to score features (nq, dim).

    Its kind (from the manifest) loads its searcher: flat shards are held in
    memory, or with ``stream_shards=True`` loaded one at a time for each query
    batch (for indexes larger than memory; every load re-checks the shard's
    sha256), merged exactly either way. Each flat shard is read straight into
    its faiss index and held as that one copy (knn.FlatShard). IVF indexes are
    read whole, or memory-mapped when their lists are on disk. ``device``:
    'auto' puts the search on the GPU when faiss sees one (see
    dn2ops.index.gpu), 'cpu' forces the CPU, 'cuda' without a GPU raises
    DeviceError.
    """

    def __init__(self, directory: str, *, verify: bool = True, stream_shards: bool = False,
                 device: str = "auto"):
        self.manifest = outputs.require_complete(directory, KIND)
        self.device = gpu.resolve_faiss_device(device)
        self.verify = verify
        self.stream_shards = stream_shards
        self.files = IndexDir(directory, self.manifest, verify=verify)
        self.files.check_present()
        self.k = int(self.manifest["k"])
        self.index_id = self.manifest["index_id"]
        self.kind = kinds.for_manifest(self.manifest)
        self.searcher = self.kind.load(self.files, device=self.device,
                                       stream_shards=stream_shards)
        self.uris, self.reference = self._load_normal()
        self.train_scores = self.reference.scores  # sorted: the percentile's reference

    @property
    def centroids(self) -> np.ndarray | None:
        """The centres (C, dim) float32 of a K-means index; None for other kinds."""
        return getattr(self.searcher, "centroids", None)

    def _load_normal(self) -> tuple[list[str], Reference]:
        """The kept normal images' uris (by id) and the normal reference."""
        normal = read_normal(self.files)
        uris = normal.filter(normal.column("kept")).column("uri").to_pylist()
        return uris, reference_of(self.manifest, normal)

    def iter_shards(self) -> Iterator[np.ndarray]:
        """The flat shards' vectors (n_s, dim) float32 as stored, read (and checked) one
        at a time."""
        return self.files.iter_shards()

    def metadata(self) -> dict[str, Any]:
        return {key: self.manifest[key] for key in ("backbone", "dim", "preprocessing")}

    def search(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (nq,) float64, neighbour distances (nq, k'), neighbour ids (nq, k')).

        Exact mode: mean Euclidean distance over the k nearest normal features,
        merged exactly over all shards (held or streamed: the same result).
        IVF and HNSW modes: the same over approximate neighbours (>= exact).
        K-means mode: distance to the nearest centre, and no neighbours
        (k' = 0): that is what makes it O(C).
        """
        xq = as_float32(xq, name="features")
        if xq.shape[1] != self.manifest["dim"]:
            raise features.MetadataMismatch(
                f"features have dimension {xq.shape[1]}, the index {self.manifest['dim']}")
        xq = transforms.apply(xq, self.manifest.get("feature_transform", "none"))
        return self.searcher.search(xq)

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """% (0..100) (nq,) of the normal set's own reference scores strictly below each
        score (nq,)."""
        return self.reference.percentile(scores)

    def p_values(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p (nq,) float64, source (nq,) 'rank' | 'tail') of scores (nq,) against the
        normal reference (dn2ops.index.calibration): small p = anomalous; for a new normal
        image, P(p <= alpha) <= alpha under exchangeability."""
        return self.reference.p_values(scores)
