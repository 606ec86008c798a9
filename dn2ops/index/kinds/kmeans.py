"""The K-means kind (``--kmeans C``): the flat shards plus ``kmeans.faiss``, an IndexFlatL2
over C centres; a score is the distance to the nearest centre (the paper's K-means
speed-up: O(C) a query, no neighbours).

Its reference is out of sample: an image the centres were trained on lies near its own
centre, so in-sample distances (DN2Scorer's train_scores_) are too small and would make
p-values too small. The reference takes the rows left out of the centres' training sample
when there are enough of them, else cross-fitted distances (benchmarks/calibration.py,
table ``kmeans``: with 50 centres the in-sample reference gave 36% of test normals
p <= 0.01, the 5-fold cross-fitted one 0.6%).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from dn2ops.config import IndexConfig
from dn2ops.index import streams
from dn2ops.index.files import IndexDir, flat_of, write_index
from dn2ops.index.kinds.base import Built, Growing, IndexKind, Source
from dn2ops.index.kinds.flat import grow_shards, write_shards
from dn2ops.index.knn import flat_vectors, kmeans_centroids, knn
from dn2ops.index.reference import ScoreFn, Scorer, reference_scores
from dn2ops.io import outputs

LOG = logging.getLogger("dn2")

INDEX_FILE = "kmeans.faiss"
# Rows per centroid that K-means trains on when the normal set is streamed
# (a uniform sample; sets smaller than this times C train on every row, as
# DN2Scorer does).
KMEANS_SAMPLE_PER_CENTROID = 1024
# The reference holds the rows out of the training sample when at least this many (or the
# reference's size) are; else every row, each scored against centres trained on the other
# KMEANS_FOLDS - 1 folds of the training sample (the folds' centres serve the reference
# only).
KMEANS_HELD_OUT_MIN = 200
KMEANS_FOLDS = 5
HOW = "distance to the nearest centre"


def held_out(centroids: np.ndarray, train_ids: np.ndarray) -> ScoreFn:
    """Distances (m, 1) to the nearest centre; NaN (not in the reference) for the rows
    ``train_ids`` (sorted) the centres were trained on."""
    def score(xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        D = knn(xq, centroids, 1)[0].astype(np.float32)
        D[np.isin(ids, train_ids)] = np.nan
        return D
    return score


def cross_fitted(centroids: np.ndarray, train_ids: np.ndarray, train_x: np.ndarray,
                 n_centroids: int, seed: int) -> ScoreFn:
    """Distances (m, 1): a row of the training sample ``train_ids`` (sorted; vectors
    ``train_x``) to the nearest of the centres trained without its fold (KMEANS_FOLDS
    random folds, min(C, rows) centres each), any other row to ``centroids``."""
    t = len(train_ids)
    folds = min(KMEANS_FOLDS, t)
    fold = np.empty(t, np.int64)
    fold[np.random.default_rng(seed + 5).permutation(t)] = np.arange(t) % folds
    centres = [kmeans_centroids(train_x[fold != f], min(n_centroids, int((fold != f).sum())),
                                seed=seed) for f in range(folds)]

    def score(xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        D = knn(xq, centroids, 1)[0].astype(np.float32)
        at = np.minimum(np.searchsorted(train_ids, ids), t - 1)
        hit = train_ids[at] == ids
        for f in range(folds):
            sel = hit & (fold[at] == f)
            if sel.any():
                D[sel] = knn(xq[sel], centres[f], 1)[0]
        return D
    return score


def out_of_sample(centroids: np.ndarray, train_ids: np.ndarray,
                  train_x: Callable[[], np.ndarray], *, n: int, size: int, n_centroids: int,
                  seed: int) -> Scorer:
    """The reference's scorer over n kept rows, the centres trained on ``train_ids``
    (``train_x()``: their vectors): held out when at least min(size, KMEANS_HELD_OUT_MIN)
    rows are not in the training sample (the reference's ``size``), else cross-fitted."""
    held = n - len(train_ids)
    if held >= min(size, KMEANS_HELD_OUT_MIN):
        return Scorer(held_out(centroids, train_ids),
                      f"{HOW}, out of sample: rows not in the centres' training sample",
                      share=held / n)
    return Scorer(cross_fitted(centroids, train_ids, train_x(), n_centroids, seed),
                  f"{HOW}, out of sample: cross-fitted over {KMEANS_FOLDS} folds of the "
                  "centres' training sample")


def training_ids(meta: dict[str, Any], n_old: int, seed: int) -> np.ndarray:
    """The rows the centres of a K-means index (its manifest entry ``meta``) were trained
    on: its ``sample_of`` rows sampled with its ``seed`` (an index that predates them: its
    ``n_old`` kept rows, ``seed``)."""
    return streams.sample_ids(int(meta.get("sample_of", n_old)), int(meta["trained_on"]),
                              int(meta.get("seed", seed)))


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
    how = HOW
    neighbours = False

    def wanted(self, config: IndexConfig) -> bool:
        return config.n_centroids is not None

    def recorded(self, manifest: dict[str, Any]) -> bool:
        return manifest.get("n_centroids") is not None

    def min_kept(self, config: IndexConfig) -> int:
        return int(config.n_centroids)

    def reference_reusable(self, retrain: bool) -> bool:
        # Scored afresh (O(C) a row): which rows are out of sample changes with the union.
        return False

    def build(self, fs, stage: str, src: Source, c: IndexConfig, device: str) -> Built:
        """Flat shards and kmeans.faiss, trained on a sample gathered as the shards are
        written."""
        km_ids = streams.sample_ids(src.n, KMEANS_SAMPLE_PER_CENTROID * c.n_centroids, c.seed)
        checksums, n_flat, (ref_x, km_x) = write_shards(fs, stage, src, c, km_ids)
        centroids = kmeans_centroids(km_x, int(c.n_centroids), seed=c.seed)
        checksums[INDEX_FILE] = write_index(fs, outputs.join(stage, INDEX_FILE),
                                            flat_of(centroids))
        size = src.n if src.ref_ids is None else len(src.ref_ids)
        scorer = out_of_sample(centroids, km_ids, lambda: km_x, n=src.n, size=size,
                               n_centroids=int(c.n_centroids), seed=c.seed)
        ref, ref_d = reference_scores(scorer.score, src.chunks, src.n, src.ref_ids, ref_x,
                                      keep=self.width(c.k))
        info = {"trained_on": int(len(km_x)), "sample_of": src.n, "seed": c.seed}
        return Built(checksums, ref, ref_d, scorer, n_flat=n_flat, info={self.key: info})

    def grow(self, g: Growing) -> tuple[Scorer, dict[str, Any]]:
        """The shards grown as a flat index's; the parent's centres kept (and their drift
        reported), or with ``retrain`` new ones trained on a sample of the union. The
        reference is out of sample as a build's (the added rows are, for kept centres)."""
        _, info = grow_shards(g)
        c = int(g.parent["n_centroids"])
        centroids = centroids_of(g.parent_dir)
        moved = drift(g, centroids)
        km_x = None
        if g.retrain:
            km_ids = streams.sample_ids(g.n, KMEANS_SAMPLE_PER_CENTROID * c, g.seed)
            km_x = streams.gather_rows(g.union(), km_ids)
            centroids = kmeans_centroids(km_x, c, seed=g.seed)
            g.write(INDEX_FILE, flat_of(centroids))
            meta = {"trained_on": int(len(km_ids)), "sample_of": g.n, "seed": g.seed,
                    "retrained": True}
        else:
            g.copy(INDEX_FILE, INDEX_FILE)
            meta = {**(g.parent.get(self.key) or {}), "retrained": False}
            km_ids = training_ids(meta, g.n_old, g.seed)
        size = g.n if g.reference_sample is None else min(g.reference_sample, g.n)
        scorer = out_of_sample(
            centroids, km_ids,
            lambda: streams.gather_rows(g.union(), km_ids) if km_x is None else km_x,
            n=g.n, size=size, n_centroids=c, seed=g.seed)
        return scorer, {**info, self.key: {**meta, "drift": moved}}

    def load(self, files: IndexDir, *, device: str, stream_shards: bool) -> CentroidSearcher:
        """Only the centres: K-means scoring never reads the shards."""
        return CentroidSearcher(centroids_of(files))
