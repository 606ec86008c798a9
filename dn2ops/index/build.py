"""Building INDEX_DIR: the streaming builder over a features directory, and the
in-memory one over a few vectors (the pooled features of normal sets)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dn2ops import transforms
from dn2ops.config import IndexConfig, check_fit_size, cleaning_k
from dn2ops.index import gpu, hnsw, ivf, streams
from dn2ops.index.files import (
    KIND,
    IndexError_,
    file_sha256,
    flat_of,
    put,
    read_index,
    shard_name,
    write_index,
)
from dn2ops.index.knn import FlatShard, as_float32, flat_vectors, kmeans_centroids, knn, knn_sharded
from dn2ops.io import features, outputs
from dn2ops.io import progress as progress_log

# Rows per centroid that K-means trains on when the normal set is streamed
# (a uniform sample; sets smaller than this times C train on every row, as
# DN2Scorer does).
KMEANS_SAMPLE_PER_CENTROID = 1024


# Query rows searched at once when computing reference scores of a sample.
_QUERY_BLOCK = 8192


def feature_rows(features_dir: str) -> list[int]:
    """Rows of each feature shard, from the Parquet footers (no data read)."""
    fs, _ = outputs.fs_and_path(features_dir)
    rows = []
    for p in features.shard_paths(features_dir, "features"):
        with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
            rows.append(pq.ParquetFile(f).metadata.num_rows)
    return rows


def read_chunks(features_dir: str, dim: int, kept: np.ndarray | None = None,
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


def write_flat_shards(fs, directory: str, chunks: Iterable[np.ndarray],
                       sizes: list[int]) -> dict[str, str]:
    """Writes shard-SSSSS-of-NNNNN.faiss files of ``sizes`` rows each; returns name -> sha256."""
    checksums = {}
    fs.makedirs(directory, exist_ok=True)
    for i, xb in enumerate(streams.rechunk(chunks, sizes)):
        name = shard_name(i, len(sizes))
        # The chunk and its index: the build's peak (the file is written in blocks).
        checksums[name] = write_index(fs, outputs.join(directory, name), flat_of(xb))
        del xb
    return checksums


def shard_loader(fs, directory: str, names: list[str], device: str
                  ) -> Callable[[], Iterator[FlatShard | np.ndarray]]:
    """Loads the flat shards one at a time: a FlatShard on the CPU (the read index, shifted
    in place: one copy in memory), the vectors for dn2ops.index.gpu."""
    def load() -> Iterator[FlatShard | np.ndarray]:
        for name in names:
            index = read_index(fs, outputs.join(directory, name), name)
            if device == "cuda":
                yield flat_vectors(index)  # the generator holds the index meanwhile
            else:
                yield FlatShard.adopt(index)
            del index
    return load


def shard_sizes(n: int, shards: int | None, per_feature_shard: list[int]) -> list[int]:
    """Rows per index shard: ``shards`` equal parts, or (None) one per non-empty feature shard."""
    if shards is None:
        return [c for c in per_feature_shard if c > 0]
    bounds = np.linspace(0, n, min(shards, n) + 1).astype(int)
    return [int(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def reference_scores(score: Callable[[np.ndarray, np.ndarray], np.ndarray],
                      chunks: Callable[[], Iterator[np.ndarray]], n: int,
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
              ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Leave-one-out neighbour distances (m, k) of query rows against the shards ``load()``
    yields: exact."""
    def score(xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        search = gpu.knn_sharded_gpu if device == "cuda" else knn_sharded
        D, I = search(xq, load(), k + 1)
        return streams.drop_self(D, I, ids)[0]
    return score


def approx_loo(search: Callable[..., tuple[np.ndarray, np.ndarray]], index: faiss.Index,
                k: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Leave-one-out neighbour distances (m, k) of query rows with an approximate index's
    ``search``."""
    def score(xq: np.ndarray, ids: np.ndarray) -> np.ndarray:
        D, I = search(index, xq, k + 1)
        return streams.drop_self(D, I, ids)[0]
    return score


def nearest_centre(centroids: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
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
    ``config``: the index's shape (dn2ops.config.IndexConfig documents each field);
    ``device``: 'cpu' | 'cuda' | 'auto' for the exact searches (dn2ops.index.gpu).
    Returns the manifest.
    """
    device = gpu.resolve_faiss_device(device)
    outputs.check_writable(output, KIND)
    fmeta = outputs.require_complete(features_dir, features.KIND)
    per_shard = feature_rows(features_dir)
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
    dim = int(fmeta["dim"])

    def rows(kept: np.ndarray | None = None) -> Iterator[np.ndarray]:
        return read_chunks(features_dir, dim, kept, config.feature_transform)

    return _build_committed(output, rows, per_shard, names, fmeta, features_dir, config,
                            device)


def _build_committed(output: str, rows: Callable[..., Iterator[np.ndarray]],
                     per_shard: list[int], names: pa.Table, fmeta: dict[str, Any],
                     features_dir: str, config: IndexConfig, device: str,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Builds the index into a staging folder and commits it to ``output``."""
    fs, _ = outputs.fs_and_path(output)
    staging = outputs.new_staging(output)
    _, stage_path = outputs.fs_and_path(staging)
    fs.makedirs(stage_path, exist_ok=True)
    try:
        manifest = {**_build_staged(fs, stage_path, rows, per_shard, names, fmeta,
                                    features_dir, config, device), **(extra or {})}
    except BaseException:
        outputs.discard(staging)
        raise
    outputs.commit(staging, output, manifest)
    return manifest


@dataclasses.dataclass
class _Source:
    """The kept normal rows a build reads: ``chunks()`` yields them transformed, one
    feature shard at a time; ``ref_ids`` are the rows of the percentile reference (None:
    all), ``ref_x`` those rows once gathered."""

    chunks: Callable[[], Iterator[np.ndarray]]
    n: int
    dim: int
    kept_per_shard: list[int]
    ref_ids: np.ndarray | None


@dataclasses.dataclass
class _Built:
    """One index kind's files (name -> sha256), its reference scores (n,) and distances
    (n, k'), and what the manifest records of it."""

    checksums: dict[str, str]
    ref: np.ndarray
    ref_d: np.ndarray
    n_flat: int = 0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _build_staged(fs, stage: str, rows: Callable[..., Iterator[np.ndarray]],
                  per_shard: list[int], names: pa.Table, fmeta: dict[str, Any],
                  features_dir: str, config: IndexConfig, device: str) -> dict[str, Any]:
    """The index's files in ``stage``; returns its manifest. ``rows(kept)`` yields the
    normal rows (of the bool mask ``kept``; all when None), transformed, in blocks of
    ``per_shard`` rows (fewer once cleaned)."""
    dim, n = int(fmeta["dim"]), int(sum(per_shard))
    kept = _kept_rows(fs, stage, rows, per_shard, config, device)
    n_kept = int(kept.sum())
    kept_arg = None if kept.all() else kept
    kept_per_shard = [int(kept[a:b].sum()) for a, b in
                      zip(np.cumsum([0] + per_shard[:-1]), np.cumsum(per_shard), strict=True)]
    sample = config.reference_sample
    src = _Source(
        chunks=lambda: rows(kept_arg),
        n=n_kept, dim=dim, kept_per_shard=kept_per_shard,
        ref_ids=(None if sample is None or sample >= n_kept
                 else streams.sample_ids(n_kept, sample, config.seed + 2)))
    build = (_build_ivf if config.ivf_lists is not None else
             _build_hnsw if config.hnsw_m is not None else _build_flat)
    built = build(fs, stage, src, config, device)
    built.checksums["normal.parquet"] = _write_normal(fs, stage, names, kept, built)
    return _manifest(features_dir, fmeta, config, n, n_kept, src, built)


def _kept_rows(fs, stage: str, rows: Callable[..., Iterator[np.ndarray]],
               per_shard: list[int], config: IndexConfig, device: str) -> np.ndarray:
    """Rows (n,) bool kept by --clean-fraction: every row's exact leave-one-out score over
    cleaning_k neighbours (provisional shards of all rows, removed after), as DN2Scorer."""
    n = int(sum(per_shard))
    kept = np.ones(n, bool)
    c = config
    min_keep = c.k + 1 if c.n_centroids is None else int(c.n_centroids)
    n_drop = min(round(float(c.clean_fraction) * n), n - min_keep)
    if c.clean_fraction <= 0 or n_drop <= 0:
        return kept
    tmp = outputs.join(stage, "_clean")
    sizes = shard_sizes(n, c.shards, per_shard)
    tmp_names = list(write_flat_shards(fs, tmp, rows(), sizes))
    load = shard_loader(fs, tmp, tmp_names, device)
    loo = reference_scores(
        flat_loo(load, cleaning_k(c.k, c.clean_k, n), device),
        rows, n, None,
        progress=progress_log.Progress(
            n, "--clean-fraction: leave-one-out scores of every normal image"))
    fs.rm(tmp, recursive=True)
    # As DN2Scorer: the n_drop highest scores go, ties -> lower row first.
    kept[np.argsort(-loo, kind="stable")[:n_drop]] = False
    return kept


def _build_ivf(fs, stage: str, src: _Source, c: IndexConfig, device: str) -> _Built:
    """ivf.faiss (and ivf.ivfdata with --ondisk); nprobe measured against the target."""
    n = src.n
    nlist = int(min(c.ivf_lists, n))
    train_ids = streams.sample_ids(n, ivf.train_size(n, nlist, c.pq_m), c.seed)
    q_ids = streams.sample_ids(n, c.recall_queries, c.seed + 1)
    # Samples are gathered during one pass over the features (a Tap), not in passes of
    # their own: at scale every pass is minutes of reading.
    tap = streams.Tap(src.chunks(), train_ids, q_ids, src.ref_ids)
    for _ in tap:
        pass
    index, info = ivf.build(src.chunks, n, src.dim, k=c.k, nlist=nlist, pq=c.pq_m,
                            nprobe=c.nprobe, target_recall=c.target_recall,
                            train_x=tap.rows(0), q_ids=q_ids, xq=tap.rows(1),
                            ondisk_dir=stage if c.ondisk else None)
    ref_x = tap.rows(2)
    del tap
    checksums = {}
    if c.ondisk:
        faiss.write_index(index, outputs.join(stage, ivf.INDEX_FILE))
        for name in (ivf.INDEX_FILE, ivf.DATA_FILE):
            checksums[name] = file_sha256(fs, outputs.join(stage, name))
    else:
        checksums[ivf.INDEX_FILE] = write_index(fs, outputs.join(stage, ivf.INDEX_FILE), index)
    ref, ref_d = reference_scores(approx_loo(ivf.search, index, c.k), src.chunks, n,
                                  src.ref_ids, ref_x, keep=c.k)
    return _Built(checksums, ref, ref_d, info={"ivf": info})


def _build_hnsw(fs, stage: str, src: _Source, c: IndexConfig, device: str) -> _Built:
    """hnsw.faiss; efSearch measured against the target."""
    q_ids = streams.sample_ids(src.n, c.recall_queries, c.seed + 1)
    tap = streams.Tap(src.chunks(), q_ids, src.ref_ids)
    for _ in tap:
        pass
    index, info = hnsw.build(src.chunks, src.n, src.dim, k=c.k, m=c.hnsw_m, q_ids=q_ids,
                             xq=tap.rows(0), ef_search=c.ef_search,
                             target_recall=c.target_recall)
    ref_x = tap.rows(1)
    del tap
    checksums = {hnsw.INDEX_FILE: write_index(fs, outputs.join(stage, hnsw.INDEX_FILE), index)}
    ref, ref_d = reference_scores(approx_loo(hnsw.search, index, c.k), src.chunks, src.n,
                                  src.ref_ids, ref_x, keep=c.k)
    return _Built(checksums, ref, ref_d, info={"hnsw": info})


def _build_flat(fs, stage: str, src: _Source, c: IndexConfig, device: str) -> _Built:
    """Flat shards, written as the rows stream by; with --kmeans also kmeans.faiss."""
    km_ids = (None if c.n_centroids is None else
              streams.sample_ids(src.n, KMEANS_SAMPLE_PER_CENTROID * c.n_centroids, c.seed))
    sizes = shard_sizes(src.n, c.shards, src.kept_per_shard)
    tap = streams.Tap(src.chunks(), src.ref_ids, km_ids)
    checksums = write_flat_shards(fs, stage, tap, sizes)
    ref_x, km_x = tap.rows(0), tap.rows(1)
    del tap
    if c.n_centroids is not None:
        return _add_kmeans(fs, stage, src, c, checksums, ref_x, km_x, len(sizes))
    load = shard_loader(fs, stage, sorted(checksums), device)
    ref, ref_d = reference_scores(flat_loo(load, c.k, device), src.chunks, src.n,
                                  src.ref_ids, ref_x, keep=c.k)
    return _Built(checksums, ref, ref_d, n_flat=len(sizes))


def _add_kmeans(fs, stage: str, src: _Source, c: IndexConfig, checksums: dict[str, str],
                ref_x: np.ndarray | None, km_x: np.ndarray, n_flat: int) -> _Built:
    centroids = kmeans_centroids(km_x, int(c.n_centroids), seed=c.seed)
    checksums["kmeans.faiss"] = write_index(fs, outputs.join(stage, "kmeans.faiss"),
                                            flat_of(centroids))
    # In-sample distance to the nearest centre, as DN2Scorer (biased low).
    ref, ref_d = reference_scores(nearest_centre(centroids), src.chunks, src.n, src.ref_ids,
                                  ref_x, keep=1)
    return _Built(checksums, ref, ref_d, n_flat=n_flat,
                  info={"kmeans": {"trained_on": int(len(km_x))}})


def _write_normal(fs, stage: str, names: pa.Table, kept: np.ndarray, built: _Built) -> str:
    """normal.parquet: uri, sha256, kept, id, loo_score, loo_distances; returns its sha256."""
    n = len(kept)
    ids = np.full(n, -1, np.int64)
    ids[kept] = np.arange(int(kept.sum()))
    loo = np.full(n, np.nan)
    loo[kept] = built.ref
    loo_d = np.full((n, built.ref_d.shape[1]), np.nan, np.float32)
    loo_d[kept] = built.ref_d
    normal = pa.table({"uri": names.column("uri"), "sha256": names.column("sha256"),
                       "kept": pa.array(kept), "id": pa.array(ids), "loo_score": pa.array(loo),
                       "loo_distances": distances_column(loo_d)})
    buf = io.BytesIO()
    pq.write_table(normal, buf)
    return put(fs, outputs.join(stage, "normal.parquet"), buf.getvalue())


def _reference_how(c: IndexConfig) -> str:
    return ("distance to the nearest centre" if c.n_centroids is not None else
            "leave-one-out, IVF (approximate)" if c.ivf_lists is not None else
            "leave-one-out, HNSW (approximate)" if c.hnsw_m is not None else
            "leave-one-out, exact")


def _manifest(features_dir: str, fmeta: dict[str, Any], c: IndexConfig, n: int, n_kept: int,
              src: _Source, built: _Built) -> dict[str, Any]:
    checksums = dict(sorted(built.checksums.items()))
    sample = None if src.ref_ids is None else len(src.ref_ids)
    return {
        **_backbone_fields(fmeta),
        "k": c.k, "n_centroids": c.n_centroids, "clean_fraction": c.clean_fraction,
        "clean_k": cleaning_k(c.k, c.clean_k, n) if c.clean_fraction > 0 else None,
        "feature_transform": c.feature_transform,
        "shards": built.n_flat,
        "counts": {"normal_in": n, "kept": n_kept, "dropped": n - n_kept},
        "ivf": built.info.get("ivf"), "hnsw": built.info.get("hnsw"),
        "kmeans": built.info.get("kmeans"),
        "reference": {"scores": int(np.isfinite(built.ref).sum()),
                      "sample": sample, "of": n_kept,
                      "percentile_error": round(streams.percentile_error(sample), 3),
                      "how": _reference_how(c)},
        **_stamp(checksums, features_dir),
    }


def _backbone_fields(fmeta: dict[str, Any]) -> dict[str, Any]:
    return {"kind": KIND, "backbone": fmeta["backbone"], "dim": fmeta["dim"],
            "preprocessing": fmeta["preprocessing"],
            "weights_sha256": fmeta.get("weights_sha256")}


def _stamp(checksums: dict[str, str], features_dir: str) -> dict[str, Any]:
    """files, features_dir, created_at and index_id (a digest of the files' digests)."""
    return {"files": checksums, "features_dir": features_dir,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "index_id": hashlib.sha256("".join(checksums.values()).encode()).hexdigest()[:16]}


def build_index_from_arrays(uris: list[str], sha256s: list[str], X: np.ndarray,
                            fmeta: dict[str, Any], output: str,
                            config: IndexConfig = IndexConfig(), *, device: str = "cpu",
                            features_dir: str = "", extra: dict[str, Any] | None = None
                            ) -> dict[str, Any]:
    """Builds INDEX_DIR ``output`` over vectors X (n, dim) named ``uris``, held in memory.

    For vectors that are not a features directory and are few, e.g. the pooled
    features of normal sets (dn2ops.score.sets); the same builder, layout and
    scores as build_index. ``fmeta`` is the backbone metadata (backbone, dim,
    preprocessing); ``extra`` keys are added to the manifest (e.g. group_by and
    pool for an index of sets). Returns the manifest.
    """
    X = as_float32(X, name="X")
    check_fit_size(k=config.k, n_centroids=config.n_centroids,
                   clean_fraction=config.clean_fraction, n=len(X))
    outputs.check_writable(output, KIND)
    names = pa.table({"uri": pa.array(uris, pa.string()),
                      "sha256": pa.array(sha256s, pa.string())})

    def rows(kept: np.ndarray | None = None) -> Iterator[np.ndarray]:
        yield transforms.apply(X if kept is None else X[kept], config.feature_transform)

    return _build_committed(output, rows, [len(X)], names, fmeta, features_dir, config,
                            gpu.resolve_faiss_device(device), extra)
