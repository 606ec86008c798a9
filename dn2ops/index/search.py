"""A committed INDEX_DIR loaded for scoring: LoadedIndex.search over flat shards (held
or streamed), IVF, HNSW, K-means centres, on the CPU or a GPU."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dn2ops import transforms
from dn2ops.index import gpu, hnsw, ivf
from dn2ops.index.files import (
    KIND,
    IndexError_,
    check_flat_header,
    corrupt,
    file_sha256,
    mismatch,
    read_index,
)
from dn2ops.index.knn import ExactShard, FlatShard, as_float32, flat_vectors, knn, knn_sharded
from dn2ops.io import features, outputs


class LoadedIndex:
    """A verified index directory, ready to score features (nq, dim).

    Flat shards are held in memory, or with ``stream_shards=True`` loaded one
    at a time for each query batch (for indexes larger than memory; every
    load re-checks the shard's sha256), merged exactly either way. Each flat
    shard is read straight into its faiss index and held as that one copy
    (knn.FlatShard). IVF indexes are read whole, or memory-mapped when their
    lists are on disk. ``device``: 'auto' puts the search on the GPU when
    faiss sees one (see dn2ops.index.gpu), 'cpu' forces the CPU, 'cuda' without a
    GPU raises DeviceError.
    """

    def __init__(self, directory: str, *, verify: bool = True, stream_shards: bool = False,
                 device: str = "auto"):
        self.manifest = outputs.require_complete(directory, KIND)
        self.device = gpu.resolve_faiss_device(device)
        self.verify = verify
        self.stream_shards = stream_shards
        self._fs, self._path = outputs.fs_and_path(directory)
        files = self.manifest["files"]
        for name in files:
            if not self._fs.exists(outputs.join(self._path, name)):
                raise IndexError_(f"index file {name} listed in the manifest is missing "
                                  f"from {directory}")
        self.k = int(self.manifest["k"])
        self.index_id = self.manifest["index_id"]
        self.shard_names = sorted(n for n in files if n.startswith("shard-"))
        self.centroids = self._load_centroids() if "kmeans.faiss" in files else None
        self.ivf_index = self._ivf_cpu = self.hnsw_index = None
        self._flat: list[ExactShard] = []  # flat shards held (FlatShard, or GpuFlat)
        self._search = self._load_searcher()
        self.uris, self.train_scores = self._load_normal()

    def _load_searcher(self) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """The one searcher of this index's kind: transformed features (nq, dim) -> the
        neighbour distances D (nq, k') and ids I (nq, k') that the scores average."""
        if self.centroids is not None:  # K-means mode needs only the centres
            return lambda xq: knn(xq, self.centroids, 1)
        if self.manifest.get("hnsw"):  # searched on the CPU (faiss has no GPU HNSW)
            self.hnsw_index = self._load_hnsw()
            return lambda xq: hnsw.search(self.hnsw_index, xq, self.k)
        if self.manifest.get("ivf"):
            meta = self.manifest["ivf"]
            self._ivf_cpu = self.ivf_index = self._load_ivf(meta)
            if self.device == "cuda" and not meta["ondisk"]:
                self.ivf_index = gpu.to_gpu(self._ivf_cpu)
            return lambda xq: ivf.search(self.ivf_index, xq, self.k, fallback=self._ivf_cpu)
        if self.stream_shards:
            for name in self.shard_names:  # fail before any heavy work; loads check again
                self._check_flat(name)
                if self.verify:
                    self._check_file(name)
        else:  # built once, searched for every query batch
            self._flat = list(self._search_shards())
        return lambda xq: knn_sharded(xq, self._flat or self._search_shards(), self.k)

    def _load_centroids(self) -> np.ndarray:
        centres = self._read_flat("kmeans.faiss")  # held while its vectors are copied
        return flat_vectors(centres).copy()

    def _load_hnsw(self) -> faiss.Index:
        if self.verify:  # before faiss parses anything
            self._check_file(hnsw.INDEX_FILE)
        index = read_index(self._fs, outputs.join(self._path, hnsw.INDEX_FILE),
                           hnsw.INDEX_FILE)
        hnsw.set_ef(index, self.manifest["hnsw"]["ef_search"])
        return index

    def _load_normal(self) -> tuple[list[str], np.ndarray]:
        """The kept normal images' uris (by id) and their sorted reference scores."""
        try:
            normal = pq.read_table(io.BytesIO(self._read("normal.parquet")))
        except pa.ArrowException as e:  # checksum recomputed over a damaged file
            raise IndexError_(f"index file normal.parquet is corrupt or truncated: {e}; "
                              "rebuild the index") from None
        kept = normal.filter(normal.column("kept"))
        ref = kept.column("loo_score").to_numpy()
        return kept.column("uri").to_pylist(), np.sort(ref[np.isfinite(ref)])

    @property
    def shards_held(self) -> int:
        """Flat shards held in memory (0 when streamed, IVF or K-means)."""
        return len(self._flat)

    def _read(self, name: str) -> bytes:
        """The bytes of a small index file, checked against the manifest's sha256."""
        data = self._fs.cat_file(outputs.join(self._path, name))
        if self.verify:
            got = hashlib.sha256(data).hexdigest()
            if got != self.manifest["files"][name]:
                raise mismatch(name, got, self.manifest["files"][name])
        return data

    def _check_file(self, name: str) -> None:
        """Checks one file's sha256 reading it in blocks (for files larger than memory)."""
        got = file_sha256(self._fs, outputs.join(self._path, name))
        if got != self.manifest["files"][name]:
            raise mismatch(name, got, self.manifest["files"][name])

    def _check_flat(self, name: str) -> None:
        check_flat_header(self._fs, outputs.join(self._path, name), name, self.manifest["dim"])

    def _read_flat(self, name: str) -> faiss.Index:
        """One flat index file read into its faiss index (header checked first, sha256
        checked while reading)."""
        self._check_flat(name)
        return read_index(self._fs, outputs.join(self._path, name), name,
                           self.manifest["files"][name] if self.verify else None)

    def _load_ivf(self, meta: dict[str, Any]) -> faiss.Index:
        if meta["ondisk"] and not isinstance(self._fs, LocalFileSystem):
            raise IndexError_("an index with on-disk inverted lists (--ondisk) must be on a "
                              "local filesystem; copy it there first")
        if self.verify:  # before faiss parses anything
            for name in (ivf.INDEX_FILE, ivf.DATA_FILE) if meta["ondisk"] else (ivf.INDEX_FILE,):
                self._check_file(name)
        path = outputs.join(self._path, ivf.INDEX_FILE)
        if meta["ondisk"]:
            try:
                return ivf.read(path, ondisk=True, nprobe=meta["nprobe"])
            except RuntimeError as e:  # faiss raises RuntimeError on corrupt bytes
                raise corrupt(ivf.INDEX_FILE, e) from None
        index = read_index(self._fs, path, ivf.INDEX_FILE)
        ivf.set_nprobe(index, meta["nprobe"])
        return index

    def iter_shards(self) -> Iterator[np.ndarray]:
        """The flat shards' vectors (n_s, dim) float32 as stored, read (and checked) one
        at a time."""
        for name in self.shard_names:
            index = self._read_flat(name)
            xb = flat_vectors(index).copy()
            del index
            yield xb

    def _search_shards(self) -> Iterator[ExactShard]:
        """Each flat shard loaded: as a FlatShard on the CPU (the read index, shifted in
        place: one copy in memory), or put on the GPU (dn2ops.index.gpu.GpuFlat)."""
        if self.device == "cuda":
            for xb in self.iter_shards():
                yield gpu.GpuFlat(xb)
            return
        for name in self.shard_names:
            yield FlatShard.adopt(self._read_flat(name))

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
        D, I = self._search(xq)
        if self.centroids is not None:  # the distance to the nearest centre, no neighbours
            return D[:, 0].astype(np.float64), np.zeros((len(xq), 0)), np.zeros((len(xq), 0),
                                                                               np.int64)
        return D.mean(axis=1, dtype=np.float64), D, I

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """% (0..100) of the normal set's own reference scores strictly below each score."""
        return 100.0 * np.searchsorted(self.train_scores, scores, side="left") / len(
            self.train_scores)
