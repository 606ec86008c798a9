"""Building INDEX_DIR: the streaming builder over a features directory, and the
in-memory one over a few vectors (the pooled features of normal sets)."""

from __future__ import annotations

import datetime
import hashlib
import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dn2ops import transforms
from dn2ops.config import IndexConfig, check_fit_size, cleaning_k
from dn2ops.index import gpu, kinds, streams
from dn2ops.index.files import KIND, IndexError_, put
from dn2ops.index.kinds import Built, IndexKind, Source
from dn2ops.index.knn import as_float32
from dn2ops.index.reference import distances_column, flat_loo, reference_scores
from dn2ops.index.shards import shard_loader, shard_sizes, write_flat_shards
from dn2ops.io import features, outputs
from dn2ops.io import progress as progress_log


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
    kinds.for_config(config).check_output(config, fs)
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


def _build_staged(fs, stage: str, rows: Callable[..., Iterator[np.ndarray]],
                  per_shard: list[int], names: pa.Table, fmeta: dict[str, Any],
                  features_dir: str, config: IndexConfig, device: str) -> dict[str, Any]:
    """The index's files in ``stage``; returns its manifest. ``rows(kept)`` yields the
    normal rows (of the bool mask ``kept``; all when None), transformed, in blocks of
    ``per_shard`` rows (fewer once cleaned)."""
    kind = kinds.for_config(config)
    dim, n = int(fmeta["dim"]), int(sum(per_shard))
    kept = _kept_rows(fs, stage, rows, per_shard, config, kind.min_kept(config), device)
    n_kept = int(kept.sum())
    kept_arg = None if kept.all() else kept
    kept_per_shard = [int(kept[a:b].sum()) for a, b in
                      zip(np.cumsum([0] + per_shard[:-1]), np.cumsum(per_shard), strict=True)]
    sample = config.reference_sample
    src = Source(
        chunks=lambda: rows(kept_arg),
        n=n_kept, dim=dim, kept_per_shard=kept_per_shard,
        ref_ids=(None if sample is None or sample >= n_kept
                 else streams.sample_ids(n_kept, sample, config.seed + 2)))
    built = kind.build(fs, stage, src, config, device)
    built.checksums["normal.parquet"] = _write_normal(fs, stage, names, kept, built)
    return _manifest(features_dir, fmeta, config, n, n_kept, src, built, kind)


def _kept_rows(fs, stage: str, rows: Callable[..., Iterator[np.ndarray]],
               per_shard: list[int], config: IndexConfig, min_keep: int, device: str
               ) -> np.ndarray:
    """Rows (n,) bool kept by --clean-fraction: every row's exact leave-one-out score over
    cleaning_k neighbours (provisional shards of all rows, removed after), as DN2Scorer,
    leaving at least ``min_keep``."""
    n = int(sum(per_shard))
    kept = np.ones(n, bool)
    c = config
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


def _write_normal(fs, stage: str, names: pa.Table, kept: np.ndarray, built: Built) -> str:
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


def _manifest(features_dir: str, fmeta: dict[str, Any], c: IndexConfig, n: int, n_kept: int,
              src: Source, built: Built, kind: IndexKind) -> dict[str, Any]:
    checksums = dict(sorted(built.checksums.items()))
    sample = None if src.ref_ids is None else len(src.ref_ids)
    return {
        **_backbone_fields(fmeta),
        "k": c.k, "n_centroids": c.n_centroids, "clean_fraction": c.clean_fraction,
        "clean_k": cleaning_k(c.k, c.clean_k, n) if c.clean_fraction > 0 else None,
        "feature_transform": c.feature_transform,
        "shards": built.n_flat,
        "counts": {"normal_in": n, "kept": n_kept, "dropped": n - n_kept},
        **kinds.manifest_entries(built.info),
        "reference": {"scores": int(np.isfinite(built.ref).sum()),
                      "sample": sample, "of": n_kept,
                      "percentile_error": round(streams.percentile_error(sample), 3),
                      "how": kind.how},
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
    features of normal sets (dn2ops.score.grouping); the same builder, layout and
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
