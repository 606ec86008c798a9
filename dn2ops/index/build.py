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
from dn2ops.config import IndexConfig, check_fit_size
from dn2ops.index import cleaning, gpu, kinds, streams
from dn2ops.index.calibration import fit_tail, tail_entry
from dn2ops.index.files import KIND, IndexError_, put
from dn2ops.index.kinds import Built, IndexKind, Source
from dn2ops.index.knn import as_float32
from dn2ops.index.reference import distances_column, outside_scores
from dn2ops.io import features, outputs


def feature_rows(features_dir: str) -> list[int]:
    """Rows of each feature shard, from the Parquet footers (no data read)."""
    fs, _ = outputs.fs_and_path(features_dir)
    rows = []
    for p in features.shard_paths(features_dir, "features"):
        with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
            rows.append(pq.ParquetFile(f).metadata.num_rows)
    return rows


# Rows of features read, transformed and handed on at once by `read_chunks`: 80 MiB of
# 2560-d vectors, whatever the size of the shards `dn2 embed` wrote.
CHUNK_ROWS = 8192


def read_chunks(features_dir: str, dim: int, kept: np.ndarray | None = None,
                transform: str = "none") -> Iterator[np.ndarray]:
    """The (kept) normal vectors, transformed, in order, in blocks of at most CHUNK_ROWS
    rows: (m_i, dim). A pass holds one block (and its transform), not a feature shard."""
    start = 0
    for X in features.iter_embedding_blocks(features_dir, CHUNK_ROWS):
        n = len(X)
        if X.shape[1] != dim:
            raise features.MetadataMismatch(
                f"feature rows have dimension {X.shape[1]}, the directory says {dim}")
        mask = None if kept is None else kept[start:start + n]
        start += n
        if mask is None or mask.any():
            # Transformed, then masked (the transform is row by row: the same rows): the
            # reader still holds the block, so masking first would copy it once more.
            X = transforms.apply(X, transform)
            if mask is not None and not mask.all():
                X = X[mask]  # rebound: the whole transformed block is freed before the yield
            yield X


def build_index(features_dir: str, output: str, config: IndexConfig = IndexConfig(), *,
                device: str = "cpu") -> dict[str, Any]:
    """Builds INDEX_DIR ``output`` from a committed features directory, streaming its shards.

    Equals DN2Scorer(k, n_centroids, clean_fraction).fit on all the features
    (tested; DN2Scorer takes a fraction, not the auto rule), without holding them: the
    features are read shard by shard in several passes, and each index shard is written
    as soon as it is full. The normal rows the cleaning rule removes
    (dn2ops.index.cleaning) stay in normal.parquet with kept false and their clean_score.
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
                   clean_fraction=_fraction(config), n=n)
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
    at most CHUNK_ROWS rows (``per_shard``: the rows of each feature shard)."""
    kind = kinds.for_config(config)
    dim, n = int(fmeta["dim"]), int(sum(per_shard))
    sample = config.reference_sample
    # The reference sample is drawn among every normal row, kept or removed, so cleaning
    # does not cut the top of the normal scores (the draw of an uncleaned index is as it was).
    ref_rows = (None if sample is None or sample >= n
                else streams.sample_ids(n, sample, config.seed + 2))
    # The removed rows of the reference are copied as the cleaning reads them, not read
    # again after; under --reference-sample all (every row, any n) they are read again,
    # which holds no more than a block.
    if sample is None:
        gather = None
    else:
        gather = np.arange(n) if ref_rows is None else ref_rows
    cleaned = cleaning.clean(rows, per_shard, config, kind.min_kept(config), fs=fs,
                             stage=stage, device=device, gather=gather)
    kept = cleaned.kept
    n_kept = int(kept.sum())
    kept_arg = None if kept.all() else kept
    kept_per_shard = [int(kept[a:b].sum()) for a, b in
                      zip(np.cumsum([0] + per_shard[:-1]), np.cumsum(per_shard), strict=True)]
    src = Source(
        chunks=lambda: rows(kept_arg),
        n=n_kept, dim=dim, kept_per_shard=kept_per_shard, ref_ids=_kept_ids(kept, ref_rows))
    built = kind.build(fs, stage, src, config, device)
    loo, loo_d = _all_rows_reference(rows, cleaned, ref_rows, built, config.seed)
    built.checksums["normal.parquet"] = _write_normal(fs, stage, names, kept, loo, loo_d,
                                                      cleaned.scores)
    return _manifest(features_dir, fmeta, config, n, n_kept,
                     _reference_entry(ref_rows, loo, built), built, kind, cleaned.entry)


def _kept_ids(kept: np.ndarray, ref_rows: np.ndarray | None) -> np.ndarray | None:
    """The ids among the kept rows (kept (n,) bool) of the sampled rows ``ref_rows`` that
    were kept (None: every row is sampled)."""
    if ref_rows is None:
        return None
    return (np.cumsum(kept) - 1)[ref_rows[kept[ref_rows]]]


def _all_rows_reference(rows: Callable[..., Iterator[np.ndarray]], cleaned: cleaning.Cleaned,
                        ref_rows: np.ndarray | None, built: Built, seed: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """loo_score (n,) and loo_distances (n, k') of every normal row: the kind's scores of
    the sampled kept rows, and the sampled removed rows' (at the kind's share) against the
    kept rows, as a new image's score; NaN for rows not in the reference. The removed rows
    are those the cleaning gathered, or read again when it did not."""
    kept = cleaned.kept
    n = len(kept)
    loo = np.full(n, np.nan)
    loo_d = np.full((n, built.ref_d.shape[1]), np.nan, np.float32)
    loo[kept], loo_d[kept] = built.ref, built.ref_d
    removed = np.flatnonzero(~kept) if ref_rows is None else ref_rows[~kept[ref_rows]]
    if built.scorer.share < 1:
        removed = removed[streams.sample_ids(len(removed),
                                             round(built.scorer.share * len(removed)), seed + 4)]
    if len(removed):
        removed = np.sort(removed)  # rows(mask) yields them in order
        held = cleaned.rows_removed(removed)
        if held is None:
            mask = np.zeros(n, bool)
            mask[removed] = True
        loo[removed], loo_d[removed] = outside_scores(
            built.scorer.score, iter([held]) if held is not None else rows(mask),
            len(removed), loo_d.shape[1])
    return loo, loo_d


def _reference_entry(ref_rows: np.ndarray | None, loo: np.ndarray, built: Built
                     ) -> dict[str, Any]:
    """The manifest's ``reference``: its scores, the sample drawn ``of`` every normal row
    (removed ones included), how they were scored and the tail fitted to them."""
    n, scored = len(loo), int(np.isfinite(loo).sum())
    return {"scores": scored, "sample": None if ref_rows is None else len(ref_rows), "of": n,
            "includes_removed": True,
            "percentile_error": round(streams.percentile_error(
                None if scored == n else scored), 3),
            "how": built.scorer.how, "tail": tail_entry(fit_tail(loo))}


def _fraction(config: IndexConfig) -> float:
    """The fraction check_fit_size checks (the auto rule adapts to n, and asks nothing)."""
    return float(config.clean_fraction) if config.clean_rule == "fraction" else 0.0


def _write_normal(fs, stage: str, names: pa.Table, kept: np.ndarray, loo: np.ndarray,
                  loo_d: np.ndarray, clean_scores: np.ndarray) -> str:
    """normal.parquet: uri, sha256, kept, id, loo_score, loo_distances, clean_score (the
    cleaning rule's score (n,), NaN where none was computed); returns its sha256."""
    n = len(kept)
    ids = np.full(n, -1, np.int64)
    ids[kept] = np.arange(int(kept.sum()))
    normal = pa.table({"uri": names.column("uri"), "sha256": names.column("sha256"),
                       "kept": pa.array(kept), "id": pa.array(ids), "loo_score": pa.array(loo),
                       "loo_distances": distances_column(loo_d),
                       "clean_score": pa.array(clean_scores, pa.float64())})
    buf = io.BytesIO()
    pq.write_table(normal, buf)
    return put(fs, outputs.join(stage, "normal.parquet"), buf.getvalue())


def _manifest(features_dir: str, fmeta: dict[str, Any], c: IndexConfig, n: int, n_kept: int,
              reference: dict[str, Any], built: Built, kind: IndexKind,
              cleaned: dict[str, Any]) -> dict[str, Any]:
    checksums = dict(sorted(built.checksums.items()))
    return {
        **_backbone_fields(fmeta),
        "k": c.k, "n_centroids": c.n_centroids, "clean_fraction": c.clean_fraction,
        "clean_k": cleaned.get("clean_k"),
        "cleaning": cleaned,
        "feature_transform": c.feature_transform,
        "shards": built.n_flat,
        "counts": {"normal_in": n, "kept": n_kept, "dropped": n - n_kept},
        **kinds.manifest_entries(built.info),
        "reference": reference,
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
                   clean_fraction=_fraction(config), n=len(X))
    outputs.check_writable(output, KIND)
    names = pa.table({"uri": pa.array(uris, pa.string()),
                      "sha256": pa.array(sha256s, pa.string())})

    def rows(kept: np.ndarray | None = None) -> Iterator[np.ndarray]:
        yield transforms.apply(X if kept is None else X[kept], config.feature_transform)

    return _build_committed(output, rows, [len(X)], names, fmeta, features_dir, config,
                            gpu.resolve_faiss_device(device), extra)
