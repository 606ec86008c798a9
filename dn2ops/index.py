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

  ivf.faiss, ivf.ivfdata        with --ivf NLIST instead of the flat shards: a
                               centred IVF-Flat / IVF-PQ index (dn2ops.ivf);
                               ivf.ivfdata holds its inverted lists on disk
                               (--ondisk, memory-mapped when scoring)
  hnsw.faiss                   with --hnsw M instead: an HNSW graph index
                               (dn2ops.hnsw), held in memory when scoring

Scores are plain Euclidean (not squared) distances, averaged over k, as in
dn2ops.scorer; higher = more anomalous. Flat shards give exact scores; IVF and HNSW
scores are approximate (>= exact; the manifest records recall@k).

`build_index` streams: it reads the feature shards one at a time (several
passes), writes one index shard at a time, and computes the leave-one-out
reference scores by searching the shards it wrote, loaded one at a time, so
the whole normal set is never in memory (unless --shards 1 asks for one shard
of everything). `LoadedIndex(stream_shards=True)` scores the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dn2ops import features, gpu, hnsw, ivf, outputs, streams, transforms
from dn2ops import progress as progress_log
from dn2ops.config import IndexConfig
from dn2ops.knn import (
    FlatShard,
    as_float32,
    flat_vectors,
    kmeans_centroids,
    knn,
    knn_sharded,
)
from dn2ops.scorer import DN2Scorer, check_fit_size, cleaning_k

KIND = "index"


class IndexError_(ValueError):
    """The index directory is missing, corrupt or does not match its manifest."""


def _shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.faiss"


def _index_bytes(xb: np.ndarray) -> bytes:
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    return faiss.serialize_index(index).tobytes()


# How faiss serializes an IndexFlatL2: fourcc, d, ntotal, two unused int64, is_trained,
# metric type, then the vectors' length in floats (and the floats).
_FLAT_HEADER = struct.Struct("<4siqqq?iQ")


def _mismatch(name: str, got: str, expected: str) -> IndexError_:
    return IndexError_(f"index file {name} has sha256 {got[:12]}..., the manifest says "
                       f"{expected[:12]}...: the file was changed or damaged; rebuild the index")


def _corrupt(name: str, e: Exception) -> IndexError_:
    return IndexError_(f"index file {name} is corrupt or truncated: "
                       f"{str(e).splitlines()[0]}; rebuild the index")


def _write_index(fs, path: str, index: faiss.Index) -> str:
    """Writes ``index`` to ``path`` through faiss's callback writer, block by block (no
    serialized copy in memory, any fsspec filesystem); returns the file's sha256."""
    h = hashlib.sha256()
    with fs.open(path, "wb") as f:
        def write(block: bytes) -> int:
            h.update(block)
            f.write(block)
            return len(block)

        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    return h.hexdigest()


def _read_index(fs, path: str, name: str, expected_sha256: str | None = None) -> faiss.Index:
    """Reads a faiss index file block by block (no bytes copy in memory), hashing what it
    reads; raises IndexError_ if it is corrupt or its sha256 is not ``expected_sha256``.

    The hash is checked after faiss has parsed the file, so callers bound what a damaged
    file can make faiss allocate first (`_check_flat_header`) or check the hash before
    (`_file_sha256`).
    """
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        def read(size: int) -> bytes:
            block = f.read(size)
            h.update(block)
            return block

        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(read))
        except RuntimeError as e:  # faiss raises RuntimeError on corrupt bytes
            raise _corrupt(name, e) from None
        while block := f.read(_HASH_BLOCK):  # trailing bytes count too
            h.update(block)
    if expected_sha256 is not None and h.hexdigest() != expected_sha256:
        raise _mismatch(name, h.hexdigest(), expected_sha256)
    return index


def _check_flat_header(fs, path: str, name: str, dim: int) -> None:
    """A flat shard file's header agrees with its size and ``dim`` (so truncation shows
    without loading it, and reading it allocates no more than the file holds)."""
    with fs.open(path, "rb") as f:
        head = f.read(_FLAT_HEADER.size)
    size = fs.size(path)
    if len(head) == _FLAT_HEADER.size:
        fourcc, d, ntotal, _, _, _, _, floats = _FLAT_HEADER.unpack(head)
        if (fourcc == b"IxF2" and d == dim and floats == ntotal * d
                and size == _FLAT_HEADER.size + 4 * floats):
            return
        what = f"its header says {fourcc!r}, d={d}, {ntotal} vectors"
    else:
        what = "it is shorter than a faiss header"
    raise IndexError_(f"index file {name} is corrupt or truncated: {size} bytes, {what} "
                      f"(the manifest says d={dim}); rebuild the index")


# Rows per centroid that K-means trains on when the normal set is streamed
# (a uniform sample; sets smaller than this times C train on every row, as
# DN2Scorer does).
KMEANS_SAMPLE_PER_CENTROID = 1024
# Query rows searched at once when computing reference scores of a sample.
_QUERY_BLOCK = 8192
_HASH_BLOCK = 1 << 24


def _feature_rows(features_dir: str) -> list[int]:
    """Rows of each feature shard, from the Parquet footers (no data read)."""
    fs, _ = outputs.fs_and_path(features_dir)
    rows = []
    for p in features.shard_paths(features_dir, "features"):
        with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
            rows.append(pq.ParquetFile(f).metadata.num_rows)
    return rows


def _chunks(features_dir: str, dim: int, kept: np.ndarray | None = None,
            transform: str = "none") -> Iterator[np.ndarray]:
    """The (kept) normal vectors, transformed, one feature shard at a time: (n_i, dim)."""
    start = 0
    for _, X in features.iter_feature_shards(features_dir, columns=("embedding",)):
        n = len(X)
        if n and X.shape[1] != dim:
            raise features.MetadataMismatch(
                f"feature rows have dimension {X.shape[1]}, the directory says {dim}")
        if kept is not None:
            X = X[kept[start:start + n]]
        start += n
        if len(X):
            yield transforms.apply(X, transform)


def _flat_of(xb: np.ndarray) -> faiss.IndexFlatL2:
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    return index


def _put(fs, path: str, blob: bytes) -> str:
    """Writes ``blob`` to ``path``; returns its sha256."""
    fs.pipe_file(path, blob)
    return hashlib.sha256(blob).hexdigest()


def _file_sha256(fs, path: str) -> str:
    """sha256 of a file, read in 16 MiB blocks (index files can exceed memory)."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _write_flat_shards(fs, directory: str, chunks: Iterable[np.ndarray],
                       sizes: list[int]) -> dict[str, str]:
    """Writes shard-SSSSS-of-NNNNN.faiss files of ``sizes`` rows each; returns name -> sha256."""
    checksums = {}
    fs.makedirs(directory, exist_ok=True)
    for i, xb in enumerate(streams.rechunk(chunks, sizes)):
        name = _shard_name(i, len(sizes))
        # The chunk and its index: the build's peak (the file is written in blocks).
        checksums[name] = _write_index(fs, outputs.join(directory, name), _flat_of(xb))
        del xb
    return checksums


def _shard_loader(fs, directory: str, names: list[str], device: str
                  ) -> Callable[[], Iterator[FlatShard | np.ndarray]]:
    """Loads the flat shards one at a time: a FlatShard on the CPU (the read index, shifted
    in place: one copy in memory), the vectors for dn2ops.gpu."""
    def load() -> Iterator[FlatShard | np.ndarray]:
        for name in names:
            index = _read_index(fs, outputs.join(directory, name), name)
            if device == "cuda":
                yield flat_vectors(index)  # the generator holds the index meanwhile
            else:
                yield FlatShard.adopt(index)
            del index
    return load


def _shard_sizes(n: int, shards: int | None, per_feature_shard: list[int]) -> list[int]:
    """Rows per index shard: ``shards`` equal parts, or (None) one per non-empty feature shard."""
    if shards is None:
        return [c for c in per_feature_shard if c > 0]
    bounds = np.linspace(0, n, min(shards, n) + 1).astype(int)
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _reference_scores(score: Callable[[np.ndarray, np.ndarray], np.ndarray],
                      chunks: Callable[[], Iterator[np.ndarray]], n: int,
                      ids: np.ndarray | None, xq: np.ndarray | None = None,
                      progress: progress_log.Progress | None = None, keep: int = 0
                      ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Scores (n,) float64 of the rows ``ids`` (all when None; NaN elsewhere).

    ``score(xq, ids)`` gives the neighbour distances (m, k') of query rows xq (m, d) whose
    global ids are ``ids``; a row's score is their mean. ``xq``: the rows ``ids``, when
    already gathered (else read from ``chunks()``). ``keep`` = k': also return the
    distances, (n, k') float32 (NaN rows elsewhere), which ``--add`` merges with the
    distances to the added images (dn2ops.index_add).
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


def _flat_loo(load: Callable[[], Iterator[FlatShard | np.ndarray]], k: int, device: str
              ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Leave-one-out neighbour distances (m, k) of query rows against the shards ``load()``
    yields: exact."""
    def score(xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        search = gpu.knn_sharded_gpu if device == "cuda" else knn_sharded
        D, I = search(xq, load(), k + 1)
        return streams.drop_self(D, I, ids)[0]
    return score


def _approx_loo(search: Callable[..., tuple[np.ndarray, np.ndarray]], index: faiss.Index,
                k: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Leave-one-out neighbour distances (m, k) of query rows with an approximate index's
    ``search``."""
    def score(xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        D, I = search(index, xq, k + 1)
        return streams.drop_self(D, I, ids)[0]
    return score


def _nearest_centre(centroids: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """K-means mode's reference: the distance (m, 1) to the nearest centre (in-sample)."""
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


def build_index(features_dir: str, output: str, config: IndexConfig = IndexConfig(), *,
                device: str = "cpu") -> dict[str, Any]:
    """Builds INDEX_DIR ``output`` from a committed features directory, streaming its shards.

    Equals DN2Scorer(k, n_centroids, clean_fraction).fit on all the features
    (tested), without holding them: the features are read shard by shard in
    several passes, and each index shard is written as soon as it is full.

    ``config`` (dn2ops.config.IndexConfig, validated when built):
      shards: split the kept set into this many equal flat shards (peak memory
        ~ one shard); None: one index shard per feature shard.
      n_centroids: K-means mode; trains on a uniform sample of
        KMEANS_SAMPLE_PER_CENTROID * C rows (all rows of smaller sets).
      clean_fraction: needs every row's exact leave-one-out score first
        (quadratic in n): pass 1 writes provisional shards of all rows and
        scores them, pass 2 rebuilds without the dropped rows.
      clean_k: neighbours of the cleaning score (DN2Scorer's; None: max(k, CLEAN_K)).
      ivf_lists, pq_m, nprobe, target_recall, ondisk: an IVF index instead of
        flat shards (see dn2ops.ivf); nprobe None picks the smallest power of
        two whose measured recall@k reaches target_recall. ondisk needs a
        local output directory.
      hnsw_m, ef_search: an HNSW graph index (dn2ops.hnsw) with M neighbours
        per node instead; ef_search None picks the smallest of 16, 32, ...
        reaching target_recall.
      reference_sample: compute the percentile reference (leave-one-out
        scores) on a uniform sample of this many kept rows (other rows get NaN;
        the manifest records the sample and its percentile_error); None: every
        row, exact leave-one-out over n rows, which costs n^2 d.
      recall_queries: sampled rows the IVF recall is measured on.
      feature_transform: dn2ops.transforms name, applied to the normal features here
        and to every scored feature by LoadedIndex.search (recorded in the manifest).
    ``device``: 'cpu' | 'cuda' | 'auto' for the exact searches (dn2ops.gpu).
    Returns the manifest.
    """
    device = gpu.resolve_faiss_device(device)
    outputs.check_writable(output, KIND)
    fmeta = outputs.require_complete(features_dir, features.KIND)
    per_shard = _feature_rows(features_dir)
    n = int(sum(per_shard))
    if n == 0:
        listed = fmeta.get("count_in")
        raise IndexError_(
            f"the normal set is empty: {fmeta.get('input', features_dir)} lists no image files"
            if listed == 0 else
            f"the normal set is empty: none of the {f'{listed} ' if listed else ''}images of "
            f"{fmeta.get('input', features_dir)} could be embedded (see "
            f"{outputs.join(features_dir, 'errors-*.parquet')} for why)")
    check_fit_size(k=config.k, n_centroids=config.n_centroids,
                   clean_fraction=config.clean_fraction, n=n)
    fs, out_path = outputs.fs_and_path(output)
    if config.ondisk and not isinstance(fs, LocalFileSystem):
        raise ValueError("--ondisk needs a local --output directory (faiss memory-maps the "
                         "inverted lists)")
    names = features.read_table(features_dir, "features", columns=["uri", "sha256"])
    staging = outputs.new_staging(output)
    _, stage_path = outputs.fs_and_path(staging)
    fs.makedirs(stage_path, exist_ok=True)
    try:
        manifest = _build_staged(fs, stage_path, features_dir, fmeta, names, per_shard,
                                 config, device)
    except BaseException:
        outputs.discard(staging)
        raise
    outputs.commit(staging, output, manifest)
    return manifest


def _build_staged(fs, stage: str, features_dir: str, fmeta: dict[str, Any], names: pa.Table,
                  per_shard: list[int], config: IndexConfig, device: str) -> dict[str, Any]:
    c = config
    k, n_centroids, clean_fraction, clean_k, shards = (
        c.k, c.n_centroids, c.clean_fraction, c.clean_k, c.shards)
    ivf_lists, pq_m, nprobe, target_recall, ondisk = (
        c.ivf_lists, c.pq_m, c.nprobe, c.target_recall, c.ondisk)
    hnsw_m, ef_search, reference_sample, recall_queries, feature_transform, seed = (
        c.hnsw_m, c.ef_search, c.reference_sample, c.recall_queries, c.feature_transform,
        c.seed)
    dim = int(fmeta["dim"])
    n = int(sum(per_shard))
    kept = np.ones(n, bool)
    if clean_fraction > 0:
        min_keep = k + 1 if n_centroids is None else int(n_centroids)
        n_drop = min(round(float(clean_fraction) * n), n - min_keep)
        if n_drop > 0:
            tmp = outputs.join(stage, "_clean")
            sizes = _shard_sizes(n, shards, per_shard)
            tmp_names = list(_write_flat_shards(
                fs, tmp, _chunks(features_dir, dim, transform=feature_transform), sizes))
            load = _shard_loader(fs, tmp, tmp_names, device)
            loo = _reference_scores(
                _flat_loo(load, cleaning_k(k, clean_k, n), device),
                lambda: _chunks(features_dir, dim, transform=feature_transform), n, None,
                progress=progress_log.Progress(
                    n, "--clean-fraction: leave-one-out scores of every normal image"))
            fs.rm(tmp, recursive=True)
            # As DN2Scorer: the n_drop highest scores go, ties -> lower row first.
            kept[np.argsort(-loo, kind="stable")[:n_drop]] = False
    n_kept = int(kept.sum())
    kept_arg = None if kept.all() else kept
    kept_per_shard = [int(kept[a:b].sum()) for a, b in
                      zip(np.cumsum([0] + per_shard[:-1]), np.cumsum(per_shard), strict=True)]

    def chunks() -> Iterator[np.ndarray]:
        return _chunks(features_dir, dim, kept_arg, feature_transform)

    ref_ids = (None if reference_sample is None or reference_sample >= n_kept
               else streams.sample_ids(n_kept, reference_sample, seed + 2))
    # Samples are gathered during the first pass over the features (a Tap),
    # not in passes of their own: at scale every pass is minutes of reading.
    km_ids = (None if n_centroids is None else
              streams.sample_ids(n_kept, KMEANS_SAMPLE_PER_CENTROID * n_centroids, seed))
    checksums: dict[str, str] = {}
    ivf_info = hnsw_info = None
    n_flat = 0
    if ivf_lists is not None:
        nlist = int(min(ivf_lists, n_kept))
        train_ids = streams.sample_ids(n_kept, ivf.train_size(n_kept, nlist, pq_m), seed)
        q_ids = streams.sample_ids(n_kept, recall_queries, seed + 1)
        tap = streams.Tap(chunks(), train_ids, q_ids, ref_ids)
        for _ in tap:
            pass
        index, ivf_info = ivf.build(chunks, n_kept, dim, k=k, nlist=nlist, pq=pq_m,
                                    nprobe=nprobe, target_recall=target_recall,
                                    train_x=tap.rows(0), q_ids=q_ids, xq=tap.rows(1),
                                    ondisk_dir=stage if ondisk else None)
        ref_x = tap.rows(2)
        del tap
        if ondisk:
            faiss.write_index(index, outputs.join(stage, ivf.INDEX_FILE))
            for name in (ivf.INDEX_FILE, ivf.DATA_FILE):
                checksums[name] = _file_sha256(fs, outputs.join(stage, name))
        else:
            checksums[ivf.INDEX_FILE] = _write_index(fs, outputs.join(stage, ivf.INDEX_FILE),
                                                     index)

        ref, ref_d = _reference_scores(_approx_loo(ivf.search, index, k), chunks, n_kept,
                                       ref_ids, ref_x, keep=k)
        del index
    elif hnsw_m is not None:
        q_ids = streams.sample_ids(n_kept, recall_queries, seed + 1)
        tap = streams.Tap(chunks(), q_ids, ref_ids)
        for _ in tap:
            pass
        index, hnsw_info = hnsw.build(chunks, n_kept, dim, k=k, m=hnsw_m, q_ids=q_ids,
                                      xq=tap.rows(0), ef_search=ef_search,
                                      target_recall=target_recall)
        ref_x = tap.rows(1)
        del tap
        checksums[hnsw.INDEX_FILE] = _write_index(fs, outputs.join(stage, hnsw.INDEX_FILE),
                                                  index)
        ref, ref_d = _reference_scores(_approx_loo(hnsw.search, index, k), chunks, n_kept,
                                       ref_ids, ref_x, keep=k)
        del index
    else:
        sizes = _shard_sizes(n_kept, shards, kept_per_shard)
        tap = streams.Tap(chunks(), ref_ids, km_ids)
        checksums.update(_write_flat_shards(fs, stage, tap, sizes))
        ref_x, km_x = tap.rows(0), tap.rows(1)
        del tap
        n_flat = len(sizes)
        load = _shard_loader(fs, stage, sorted(checksums), device)
        if n_centroids is None:
            ref, ref_d = _reference_scores(_flat_loo(load, k, device), chunks, n_kept,
                                           ref_ids, ref_x, keep=k)
    kmeans_info = None
    if n_centroids is not None:
        centroids = kmeans_centroids(km_x, int(n_centroids), seed=seed)
        checksums["kmeans.faiss"] = _write_index(fs, outputs.join(stage, "kmeans.faiss"),
                                                 _flat_of(centroids))
        # In-sample distance to the nearest centre, as DN2Scorer (biased low).
        ref, ref_d = _reference_scores(_nearest_centre(centroids), chunks, n_kept, ref_ids,
                                       ref_x, keep=1)
        kmeans_info = {"trained_on": int(len(km_x))}
    ids = np.full(n, -1, np.int64)
    ids[kept] = np.arange(n_kept)
    loo = np.full(n, np.nan)
    loo[kept] = ref
    loo_d = np.full((n, ref_d.shape[1]), np.nan, np.float32)
    loo_d[kept] = ref_d
    normal = pa.table({"uri": names.column("uri"), "sha256": names.column("sha256"),
                       "kept": pa.array(kept), "id": pa.array(ids), "loo_score": pa.array(loo),
                       "loo_distances": distances_column(loo_d)})
    buf = io.BytesIO()
    pq.write_table(normal, buf)
    checksums["normal.parquet"] = _put(fs, outputs.join(stage, "normal.parquet"),
                                       buf.getvalue())
    checksums = dict(sorted(checksums.items()))
    return {
        "kind": KIND, "backbone": fmeta["backbone"], "dim": fmeta["dim"],
        "preprocessing": fmeta["preprocessing"], "weights_sha256": fmeta.get("weights_sha256"),
        "k": k, "n_centroids": n_centroids, "clean_fraction": clean_fraction,
        "clean_k": cleaning_k(k, clean_k, n) if clean_fraction > 0 else None,
        "feature_transform": feature_transform,
        "shards": n_flat,
        "counts": {"normal_in": n, "kept": n_kept, "dropped": n - n_kept},
        "ivf": ivf_info, "hnsw": hnsw_info, "kmeans": kmeans_info,
        "reference": {"scores": int(np.isfinite(ref).sum()),
                      "sample": None if ref_ids is None else int(len(ref_ids)),
                      "of": n_kept,
                      "percentile_error": round(streams.percentile_error(
                          None if ref_ids is None else len(ref_ids)), 3),
                      "how": ("distance to the nearest centre" if n_centroids is not None else
                              "leave-one-out, IVF (approximate)" if ivf_lists is not None else
                              "leave-one-out, HNSW (approximate)" if hnsw_m is not None else
                              "leave-one-out, exact")},
        "files": checksums, "features_dir": features_dir,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "index_id": hashlib.sha256("".join(checksums.values()).encode()).hexdigest()[:16],
    }


def build_index_from_arrays(uris: list[str], sha256s: list[str], X: np.ndarray,
                            fmeta: dict[str, Any], output: str, *, k: int = 2,
                            n_centroids: int | None = None, clean_fraction: float = 0.0,
                            shards: int = 1, features_dir: str = "",
                            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Builds a flat INDEX_DIR ``output`` over vectors X (n, dim) named ``uris``, in memory.

    For vectors that are not a features directory and are few, e.g. the pooled
    features of normal sets (dn2ops.group_scoring); same layout and scores as
    build_index. ``fmeta`` is the backbone metadata (backbone, dim,
    preprocessing); ``extra`` keys are added to the manifest (e.g. group_by and
    pool for an index of sets). Returns the manifest.
    """
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
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
    normal = pa.table({"uri": pa.array(uris, pa.string()),
                       "sha256": pa.array(sha256s, pa.string()),
                       "kept": pa.array(kept), "id": pa.array(ids), "loo_score": pa.array(loo)})
    buf = io.BytesIO()
    pq.write_table(normal, buf)
    files["normal.parquet"] = buf.getvalue()
    checksums = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    manifest = {
        "kind": KIND, "backbone": fmeta["backbone"], "dim": fmeta["dim"],
        "preprocessing": fmeta["preprocessing"], "weights_sha256": fmeta.get("weights_sha256"),
        "k": k, "n_centroids": n_centroids, "clean_fraction": clean_fraction,
        "shards": len(bounds) - 1,
        "counts": {"normal_in": int(len(X)), "kept": int(kept.sum()),
                   "dropped": int((~kept).sum())},
        "files": checksums, "features_dir": features_dir,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "index_id": hashlib.sha256("".join(checksums.values()).encode()).hexdigest()[:16],
        **(extra or {}),
    }
    staging = outputs.new_staging(output)
    fs, stage_path = outputs.fs_and_path(staging)
    fs.makedirs(stage_path, exist_ok=True)
    for name, data in files.items():
        fs.pipe_file(outputs.join(stage_path, name), data)
    outputs.commit(staging, output, manifest)
    return manifest


class LoadedIndex:
    """A verified index directory, ready to score features (nq, dim).

    Flat shards are held in memory, or with ``stream_shards=True`` loaded one
    at a time for each query batch (for indexes larger than memory; every
    load re-checks the shard's sha256), merged exactly either way. Each flat
    shard is read straight into its faiss index and held as that one copy
    (knn.FlatShard). IVF indexes are read whole, or memory-mapped when their
    lists are on disk. ``device``: 'auto' puts the search on the GPU when
    faiss sees one (see dn2ops.gpu), 'cpu' forces the CPU, 'cuda' without a
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
        ivf_meta = self.manifest.get("ivf")
        self.centroids = None
        if "kmeans.faiss" in files:
            centres = self._read_flat("kmeans.faiss")  # held while its vectors are copied
            self.centroids = flat_vectors(centres).copy()
            del centres
        self._flat: list[FlatShard] = []
        self.ivf_index = self._ivf_cpu = self.hnsw_index = None
        self._gpu_shards: list[gpu.GpuFlat] | None = None
        if self.manifest.get("hnsw"):  # searched on the CPU (faiss has no GPU HNSW)
            if verify:  # before faiss parses anything
                self._check_file(hnsw.INDEX_FILE)
            self.hnsw_index = _read_index(self._fs, outputs.join(self._path, hnsw.INDEX_FILE),
                                          hnsw.INDEX_FILE)
            hnsw.set_ef(self.hnsw_index, self.manifest["hnsw"]["ef_search"])
        elif ivf_meta:
            self._ivf_cpu = self._load_ivf(ivf_meta)
            self.ivf_index = self._ivf_cpu
            if self.device == "cuda" and not ivf_meta["ondisk"]:
                self.ivf_index = gpu.to_gpu(self._ivf_cpu)
        elif self.centroids is None:  # K-means mode needs only the centres
            if stream_shards:
                for name in self.shard_names:  # fail before any heavy work; loads check again
                    self._check_flat(name)
                    if verify:
                        self._check_file(name)
            elif self.device == "cuda":
                self._gpu_shards = [gpu.GpuFlat(x) for x in self.iter_shards()]
            else:
                # Built once, searched for every query batch.
                self._flat = [FlatShard.adopt(self._read_flat(n)) for n in self.shard_names]
        try:
            normal = pq.read_table(io.BytesIO(self._read("normal.parquet")))
        except pa.ArrowException as e:  # checksum recomputed over a damaged file
            raise IndexError_(f"index file normal.parquet is corrupt or truncated: {e}; "
                              "rebuild the index") from None
        kept = normal.filter(normal.column("kept"))
        self.uris = kept.column("uri").to_pylist()
        ref = kept.column("loo_score").to_numpy()
        self.train_scores = np.sort(ref[np.isfinite(ref)])

    @property
    def shards_held(self) -> int:
        """Flat shards held in memory (0 when streamed, IVF or K-means)."""
        return len(self._flat) + len(self._gpu_shards or [])

    def _read(self, name: str) -> bytes:
        """The bytes of a small index file, checked against the manifest's sha256."""
        data = self._fs.cat_file(outputs.join(self._path, name))
        if self.verify:
            got = hashlib.sha256(data).hexdigest()
            if got != self.manifest["files"][name]:
                raise _mismatch(name, got, self.manifest["files"][name])
        return data

    def _check_file(self, name: str) -> None:
        """Checks one file's sha256 reading it in blocks (for files larger than memory)."""
        got = _file_sha256(self._fs, outputs.join(self._path, name))
        if got != self.manifest["files"][name]:
            raise _mismatch(name, got, self.manifest["files"][name])

    def _check_flat(self, name: str) -> None:
        _check_flat_header(self._fs, outputs.join(self._path, name), name, self.manifest["dim"])

    def _read_flat(self, name: str) -> faiss.Index:
        """One flat index file read into its faiss index (header checked first, sha256
        checked while reading)."""
        self._check_flat(name)
        return _read_index(self._fs, outputs.join(self._path, name), name,
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
                raise _corrupt(ivf.INDEX_FILE, e) from None
        index = _read_index(self._fs, path, ivf.INDEX_FILE)
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

    def _search_shards(self) -> Iterator[FlatShard | np.ndarray]:
        """Streamed: each flat shard loaded for this search (vectors for dn2ops.gpu)."""
        if self.device == "cuda":
            yield from self.iter_shards()
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
        if self.centroids is not None:
            D, _ = knn(xq, self.centroids, 1)
            return D[:, 0].astype(np.float64), np.zeros((len(xq), 0)), np.zeros((len(xq), 0),
                                                                                  np.int64)
        if self.hnsw_index is not None:
            D, I = hnsw.search(self.hnsw_index, xq, self.k)
        elif self.ivf_index is not None:
            D, I = ivf.search(self.ivf_index, xq, self.k, fallback=self._ivf_cpu)
        elif self.device == "cuda":
            D, I = gpu.knn_sharded_gpu(xq, self._gpu_shards or self._search_shards(), self.k)
        else:
            D, I = knn_sharded(xq, self._flat or self._search_shards(), self.k)
        return D.mean(axis=1, dtype=np.float64), D, I

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """% (0..100) of the normal set's own reference scores strictly below each score."""
        return 100.0 * np.searchsorted(self.train_scores, scores, side="left") / len(
            self.train_scores)
