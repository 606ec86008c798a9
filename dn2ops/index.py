"""Index directories: the normal set as sharded faiss flat indexes plus a manifest.

Layout of INDEX_DIR:
  shard-SSSSS-of-NNNNN.faiss   IndexFlatL2 over the kept normal features
  kmeans.faiss                 IndexFlatL2 over C centroids (--kmeans C only)
  normal.parquet               uri, sha256, kept, id (row in the shards, -1 if
                               dropped by cleaning), loo_score (the normal
                               set's own leave-one-out score: the percentile
                               reference)
  _SUCCESS                     the manifest (JSON): backbone metadata, k,
                               counts, sha256 per file, created_at, index_id

Scores are plain Euclidean (not squared) distances, averaged over k, as in
dn2ops.scorer; higher = more anomalous.
"""

from __future__ import annotations

import datetime
import hashlib
import io
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dn2ops import features, outputs
from dn2ops.knn import as_float32, knn, knn_sharded
from dn2ops.scorer import DN2Scorer

KIND = "index"


class IndexError_(ValueError):
    """The index directory is missing, corrupt or does not match its manifest."""


def _shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.faiss"


def _index_bytes(xb: np.ndarray) -> bytes:
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    return faiss.serialize_index(index).tobytes()


def _vectors(data: bytes, name: str) -> np.ndarray:
    """The vectors of a serialized IndexFlatL2, (n, d) float32."""
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:  # faiss raises RuntimeError on corrupt bytes
        raise IndexError_(f"index file {name} is corrupt or truncated: "
                          f"{str(e).splitlines()[0]}") from None
    return faiss.rev_swig_ptr(faiss.downcast_index(index).get_xb(),
                              index.ntotal * index.d).reshape(index.ntotal, index.d).copy()


def build_index(features_dir: str, output: str, *, k: int = 2, n_centroids: int | None = None,
                clean_fraction: float = 0.0, shards: int = 1) -> dict[str, Any]:
    """Builds INDEX_DIR ``output`` from a committed features directory. Returns the manifest."""
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    outputs.check_writable(output, KIND)
    table, X, fmeta = features.load_features(features_dir)
    if X.shape[0] == 0:
        raise IndexError_(f"the normal set in {features_dir} is empty: no image was embedded "
                          "(see its errors-*.parquet)")
    scorer = DN2Scorer(k=k, n_centroids=n_centroids, clean_fraction=clean_fraction).fit(X)
    kept = scorer.kept_mask_
    xk = np.ascontiguousarray(X[kept])
    files: dict[str, bytes] = {}
    bounds = np.linspace(0, len(xk), min(shards, len(xk)) + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        files[_shard_name(i, len(bounds) - 1)] = _index_bytes(xk[a:b])
    if scorer.centroids_ is not None:
        files["kmeans.faiss"] = _index_bytes(scorer.centroids_)
    ids = np.full(len(X), -1, np.int64)
    ids[kept] = np.arange(kept.sum())
    loo = np.full(len(X), np.nan)
    loo[kept] = scorer.train_scores_
    normal = pa.table({"uri": table.column("uri"), "sha256": table.column("sha256"),
                       "kept": pa.array(kept), "id": pa.array(ids), "loo_score": pa.array(loo)})
    buf = io.BytesIO()
    pq.write_table(normal, buf)
    files["normal.parquet"] = buf.getvalue()
    checksums = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    manifest = {
        "kind": KIND, "backbone": fmeta["backbone"], "dim": fmeta["dim"],
        "preprocessing": fmeta["preprocessing"], "k": k, "n_centroids": n_centroids,
        "clean_fraction": clean_fraction, "shards": len(bounds) - 1,
        "counts": {"normal_in": int(len(X)), "kept": int(kept.sum()),
                   "dropped": int((~kept).sum())},
        "files": checksums, "features_dir": features_dir,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "index_id": hashlib.sha256("".join(checksums.values()).encode()).hexdigest()[:16],
    }
    staging = outputs.new_staging(output)
    fs, stage_path = outputs.fs_and_path(staging)
    fs.makedirs(stage_path, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(outputs.join(stage_path, name), data)
    outputs.commit(staging, output, manifest)
    return manifest


class LoadedIndex:
    """A verified index directory in memory, ready to score features (nq, dim)."""

    def __init__(self, directory: str, *, verify: bool = True):
        self.manifest = outputs.require_complete(directory, KIND)
        fs, path = outputs.fs_and_path(directory)
        blobs = {}
        for name, digest in self.manifest["files"].items():
            full = outputs.join(path, name)
            if not fs.exists(full):
                raise IndexError_(f"index file {name} listed in the manifest is missing "
                                  f"from {directory}")
            blobs[name] = fs.cat_file(full)
            if verify and hashlib.sha256(blobs[name]).hexdigest() != digest:
                raise IndexError_(f"index file {name} has sha256 "
                                  f"{hashlib.sha256(blobs[name]).hexdigest()[:12]}..., the "
                                  f"manifest says {digest[:12]}...: the file was changed or "
                                  "damaged; rebuild the index")
        self.k = int(self.manifest["k"])
        self.index_id = self.manifest["index_id"]
        self.shards = [_vectors(blobs[n], n) for n in sorted(blobs) if n.startswith("shard-")]
        self.centroids = (_vectors(blobs["kmeans.faiss"], "kmeans.faiss")
                          if "kmeans.faiss" in blobs else None)
        normal = pq.read_table(io.BytesIO(blobs["normal.parquet"]))
        kept = normal.filter(normal.column("kept"))
        self.uris = kept.column("uri").to_pylist()
        self.train_scores = np.sort(kept.column("loo_score").to_numpy())

    def metadata(self) -> dict[str, Any]:
        return {key: self.manifest[key] for key in ("backbone", "dim", "preprocessing")}

    def search(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (nq,) float64, neighbour distances (nq, k'), neighbour ids (nq, k')).

        Exact mode: mean Euclidean distance over the k nearest normal features,
        merged exactly over all shards. K-means mode: distance to the nearest
        centre, and no neighbours (k' = 0): that is what makes it O(C).
        """
        xq = as_float32(xq, name="features")
        if xq.shape[1] != self.manifest["dim"]:
            raise features.MetadataMismatch(
                f"features have dimension {xq.shape[1]}, the index {self.manifest['dim']}")
        if self.centroids is not None:
            D, _ = knn(xq, self.centroids, 1)
            return D[:, 0].astype(np.float64), np.zeros((len(xq), 0)), np.zeros((len(xq), 0),
                                                                                  np.int64)
        D, I = knn_sharded(xq, self.shards, self.k)
        return D.mean(axis=1, dtype=np.float64), D, I

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """% (0..100) of the normal set's own leave-one-out scores strictly below each score."""
        return 100.0 * np.searchsorted(self.train_scores, scores, side="left") / len(
            self.train_scores)
