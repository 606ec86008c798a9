"""The K-means kind (``--kmeans C``): the flat shards plus ``kmeans.faiss``, an IndexFlatL2
over C centres; a score is the distance to the nearest centre (the paper's K-means
speed-up: O(C) a query, no neighbours), the reference in-sample, as DN2Scorer."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from dn2ops.config import IndexConfig
from dn2ops.index import streams
from dn2ops.index.files import IndexDir, flat_of, write_index
from dn2ops.index.kinds.base import Built, Growing, IndexKind, Source
from dn2ops.index.kinds.flat import grow_shards, write_shards
from dn2ops.index.knn import flat_vectors, kmeans_centroids, knn
from dn2ops.index.reference import ScoreFn, nearest_centre, reference_scores
from dn2ops.io import outputs

LOG = logging.getLogger("dn2")

INDEX_FILE = "kmeans.faiss"
# Rows per centroid that K-means trains on when the normal set is streamed
# (a uniform sample; sets smaller than this times C train on every row, as
# DN2Scorer does).
KMEANS_SAMPLE_PER_CENTROID = 1024


class CentroidSearcher:
    """The distance to the nearest of the centres (C, dim); no neighbours (k' = 0)."""

    def __init__(self, centroids: np.ndarray):
        self.centroids = centroids

    def search(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        D, _ = knn(xq, self.centroids, 1)
        nq = len(xq)
        return D[:, 0].astype(np.float64), np.zeros((nq, 0)), np.zeros((nq, 0), np.int64)


def centroids_of(files: IndexDir) -> np.ndarray:
    """The centres (C, dim) float32 of a K-means index."""
    centres = files.read_flat(INDEX_FILE)  # held while its vectors are copied
    return flat_vectors(centres).copy()


def drift(g: Growing, centroids: np.ndarray) -> dict[str, Any]:
    """Mean distance to the nearest centre: the added images against the parent's
    reference (the same distance, of the images it was trained on)."""
    d = np.concatenate([knn(x, centroids, 1)[0][:, 0] for x in g.new_chunks()])
    ref = g.normal.column("loo_score").to_numpy(zero_copy_only=False)
    before = float(np.nanmean(ref)) if np.isfinite(ref).any() else float("nan")
    after = float(d.mean())
    LOG.info("K-means drift: the added images lie %.4f from their nearest centre, the "
             "parent's reference %.4f (x%.3f)%s", after, before, after / before,
             "" if g.retrain else "; --retrain trains new centres")
    return {"added_mean_distance": round(after, 6), "parent_mean_distance":
            round(before, 6), "ratio": round(after / before, 4)}


class Kmeans(IndexKind):
    """Flat shards and C K-means centres; scored against the centres only."""

    name = key = "kmeans"
    how = "distance to the nearest centre"
    neighbours = False

    def wanted(self, config: IndexConfig) -> bool:
        return config.n_centroids is not None

    def recorded(self, manifest: dict[str, Any]) -> bool:
        return manifest.get("n_centroids") is not None

    def min_kept(self, config: IndexConfig) -> int:
        return int(config.n_centroids)

    def reference_reusable(self, retrain: bool) -> bool:
        return not retrain  # new centres: every distance to them changes

    def build(self, fs, stage: str, src: Source, c: IndexConfig, device: str) -> Built:
        """Flat shards and kmeans.faiss, trained on a sample gathered as the shards are
        written."""
        km_ids = streams.sample_ids(src.n, KMEANS_SAMPLE_PER_CENTROID * c.n_centroids, c.seed)
        checksums, n_flat, (ref_x, km_x) = write_shards(fs, stage, src, c, km_ids)
        centroids = kmeans_centroids(km_x, int(c.n_centroids), seed=c.seed)
        checksums[INDEX_FILE] = write_index(fs, outputs.join(stage, INDEX_FILE),
                                            flat_of(centroids))
        # In-sample distance to the nearest centre, as DN2Scorer (biased low).
        ref, ref_d = reference_scores(nearest_centre(centroids), src.chunks, src.n,
                                      src.ref_ids, ref_x, keep=self.width(c.k))
        return Built(checksums, ref, ref_d, n_flat=n_flat,
                     info={self.key: {"trained_on": int(len(km_x))}})

    def grow(self, g: Growing) -> tuple[ScoreFn, dict[str, Any]]:
        """The shards grown as a flat index's; the parent's centres kept (and their drift
        reported), or with ``retrain`` new ones trained on a sample of the union."""
        _, info = grow_shards(g)
        c = int(g.parent["n_centroids"])
        centroids = centroids_of(g.parent_dir)
        moved = drift(g, centroids)
        if g.retrain:
            km_ids = streams.sample_ids(g.n, KMEANS_SAMPLE_PER_CENTROID * c, g.seed)
            centroids = kmeans_centroids(streams.gather_rows(g.union(), km_ids), c,
                                         seed=g.seed)
            g.write(INDEX_FILE, flat_of(centroids))
            meta = {"trained_on": int(len(km_ids)), "retrained": True}
        else:
            g.copy(INDEX_FILE, INDEX_FILE)
            meta = {**(g.parent.get(self.key) or {}), "retrained": False}
        return nearest_centre(centroids), {**info, self.key: {**meta, "drift": moved}}

    def load(self, files: IndexDir, *, device: str, stream_shards: bool) -> CentroidSearcher:
        """Only the centres: K-means scoring never reads the shards."""
        return CentroidSearcher(centroids_of(files))
