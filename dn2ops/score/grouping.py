"""Sets of images: the key that groups images into sets, their pooled features, and the
index of pooled normal sets that set scoring (dn2ops.score.sets) searches.

Images are grouped into sets by a key: ``parent_dir`` (the uri's parent directory) or
a manifest column. Sets of fewer than `MIN_SET_SIZE` images are neither indexed nor
scored.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dn2ops.config import POOLS, GroupConfig, IndexConfig
from dn2ops.errors import UserError
from dn2ops.index import IndexError_, build_index_from_arrays
from dn2ops.io import features, outputs
from dn2ops.score.set_features import pool_set

PARENT_DIR = "parent_dir"
MIN_SET_SIZE = 2


class GroupKeyError(UserError, ValueError):
    """An image has no value for the grouping key."""


def group_key(row: Mapping[str, Any], key: str) -> str:
    """The set an image belongs to: its uri's parent directory, or a manifest column.

    ``key == "parent_dir"`` always means the parent directory of ``row["uri"]``
    (spelled like the uri, e.g. ``gs://b/lot-a``), even if a manifest has a
    column of that name. Raises GroupKeyError if the column is absent or empty.
    """
    if key == PARENT_DIR:
        return posixpath.dirname(row["uri"].rstrip("/"))
    value = row.get(key)
    if value is None or str(value) == "":
        raise GroupKeyError(f"no value in manifest column {key!r} (--group-by {key})")
    return str(value)


def pool_groups(table_rows: Sequence[Mapping[str, Any]], X: np.ndarray, key: str,
                pool: str = "mean"
                ) -> tuple[list[str], list[list[str]], np.ndarray, np.ndarray]:
    """Groups images by ``key`` and pools each set's features.

    ``table_rows[i]`` (with at least ``uri`` and the key column) describes
    ``X[i]``, X float32 (n, d). Returns (group names sorted, member uris of
    each group sorted, pooled float32 (n_groups, d), sizes int64 (n_groups,)).
    Raises GroupKeyError naming how many images have no key.
    """
    if pool not in POOLS:
        raise ValueError(f"--pool must be one of {POOLS}, got {pool!r}")
    if len(table_rows) != len(X):
        raise ValueError(f"{len(table_rows)} rows but {len(X)} feature vectors")
    members: dict[str, list[int]] = {}
    missing = []
    for i, row in enumerate(table_rows):
        try:
            members.setdefault(group_key(row, key), []).append(i)
        except GroupKeyError:
            missing.append(row["uri"])
    if missing:
        raise GroupKeyError(f"{len(missing)} image(s) have no value in manifest column "
                            f"{key!r}, e.g. {missing[0]}")
    names = sorted(members)
    uris, pooled, sizes = [], [], []
    for name in names:
        idx = sorted(members[name], key=lambda i: table_rows[i]["uri"])
        uris.append([table_rows[i]["uri"] for i in idx])
        pooled.append(pool_set(X[idx], pool))
        sizes.append(len(idx))
    d = X.shape[1] if X.ndim == 2 else 0
    return (names, uris, np.stack(pooled) if pooled else np.zeros((0, d), np.float32),
            np.asarray(sizes, np.int64))


def check_key(key: str, columns: Sequence[str]) -> None:
    """Fails before any work when --group-by names a column the input does not have."""
    if key != PARENT_DIR and key not in columns:
        raise GroupKeyError(f"--group-by {key}: not a manifest column of the input "
                            f"(columns: {list(columns) or 'none'}); use parent_dir or a column")


def build_group_index(features_dir: str, output: str, index: IndexConfig,
                      group: GroupConfig) -> dict[str, Any]:
    """INDEX_DIR over the pooled features of the normal sets. Returns the manifest.

    Each indexed vector is one normal set (its ``uri`` in normal.parquet is the
    group name, its ``sha256`` a digest of its members' sha256s). Sets of fewer
    than MIN_SET_SIZE images are left out (counted in the manifest), as they
    would be when scored. The manifest records ``group_by`` and ``pool`` (None: mean).
    """
    group_by, pool = group.group_by, group.pool or "mean"
    outputs.check_writable(output, "index")
    table, X, fmeta = features.load_features(features_dir)
    check_key(group_by, fmeta.get("extra_columns", []))
    rows = table.to_pylist() if table is not None else []
    names, uris, pooled, sizes = pool_groups(rows, X, group_by, pool)
    keep = sizes >= MIN_SET_SIZE
    if not keep.any():
        raise IndexError_(f"no normal set in {features_dir} has {MIN_SET_SIZE} or more images "
                          f"when grouped by {group_by!r} ({len(names)} set(s), "
                          f"{len(X)} image(s))")
    sha = {r["uri"]: r["sha256"] for r in rows}
    digests = [hashlib.sha256("".join(sha[u] for u in members).encode()).hexdigest()
               for members in uris]
    kept_names = [n for n, ok in zip(names, keep, strict=True) if ok]
    kept_digests = [s for s, ok in zip(digests, keep, strict=True) if ok]
    return build_index_from_arrays(
        kept_names, kept_digests, pooled[keep], fmeta, output, index,
        features_dir=features_dir,
        extra={"group_by": group_by, "pool": pool,
               "group_counts": {"images": int(len(X)), "sets": len(names),
                                "sets_indexed": int(keep.sum()),
                                "sets_too_small": int((~keep).sum()),
                                "images_in_indexed_sets": int(sizes[keep].sum())}})


def check_index_mode(manifest: Mapping[str, Any], group_by: str | None,
                     pool: str | None) -> str | None:
    """Refuses an image index for set scoring and a set index for image scoring.

    Returns the pool to score with: the index's (a different ``pool`` is refused,
    since pooled sets are only comparable when pooled alike).
    """
    built_with = manifest.get("group_by")
    if group_by and not built_with:
        raise IndexError_("the index was built over single images, not sets: rebuild it with "
                          "`dn2 build-index --group-by KEY` to score with --group-by, "
                          "or use --group-score covtrace (no index)")
    if built_with and not group_by:
        raise IndexError_(f"the index was built over sets (--group-by {built_with}, --pool "
                          f"{manifest.get('pool')}): score with --group-by, or build an "
                          "image index without --group-by")
    if not group_by:
        return None
    if pool and pool != manifest.get("pool"):
        raise IndexError_(f"--pool {pool} but the index pooled its sets with --pool "
                          f"{manifest.get('pool')}; use the same pooling")
    return manifest.get("pool")
