"""Set scoring stage: feature rows -> sets of images -> ranked group rows.

Images are grouped into sets by a key: ``parent_dir`` (the uri's parent
directory) or a manifest column. A set is scored either

* ``knn``: its members' features are pooled (``mean`` or ``max``) into one
  (d,) vector, scored like an image against an index of pooled *normal* sets
  (mean Euclidean distance to the k nearest normal sets), or
* ``covtrace``: by the trace of its features' covariance
  (`dn2ops.set_features.SetSummary.covtrace`), which needs no normal data.

Sets are summarised as their members arrive (`SummariseSets`, a CombineFn), never
held whole: O(d) floats and the member uris a set.

Higher = more anomalous in both. Sets of fewer than `MIN_SET_SIZE` images are
not scored: each of their images becomes an error row with stage ``group``,
so the image accounting ``count_in == scored + errored`` still holds (scored
= images in scored sets). Ranks: 1 + the number of strictly higher scores.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import RunInference

from dn2ops import features, outputs
from dn2ops.config import POOLS, GroupConfig, IndexConfig, SearchConfig
from dn2ops.index import IndexError_, LoadedIndex, build_index_from_arrays
from dn2ops.score_images import IndexModelHandler, RankByScore
from dn2ops.set_features import SetSummary, pool_set

PARENT_DIR = "parent_dir"
STAGE = "group"  # members of a set too small to score
KEY_STAGE = "group_key"  # an image with no value for --group-by
MIN_SET_SIZE = 2
ERRORS = "group_errors"  # tag of the error output of ScoreGroups


class GroupKeyError(ValueError):
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


def _too_small(name: str, size: int) -> str:
    return (f"group {name!r} has {size} image(s); a set needs at least {MIN_SET_SIZE} "
            "to be scored")


def check_key(key: str, columns: Sequence[str]) -> None:
    """Fails before any work when --group-by names a column the input does not have."""
    if key != PARENT_DIR and key not in columns:
        raise ValueError(f"--group-by {key}: not a manifest column of the input "
                         f"(columns: {list(columns) or 'none'}); use parent_dir or a column")


# -- group index ----------------------------------------------------------------------------

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


# -- Beam ---------------------------------------------------------------------------------

def group_schema() -> pa.Schema:
    """The columns of ``groups-*.parquet``."""
    return pa.schema([
        ("group", pa.string()), ("score", pa.float64()), ("rank", pa.int64()),
        ("size", pa.int64()), ("member_uris", pa.list_(pa.string())),
        ("neighbor_groups", pa.list_(pa.string())),
        ("neighbor_distances", pa.list_(pa.float64())), ("percentile", pa.float64()),
        ("method", pa.string()), ("pool", pa.string()), ("group_by", pa.string()),
        ("partition", pa.string()), ("backbone", pa.string()), ("index_id", pa.string())])


class _KeyRows(beam.DoFn):
    """Feature row -> (group, (uri, embedding, backbone)); an image without a key -> an
    error row."""

    def __init__(self, key: str):
        self.key = key

    def process(self, row: dict[str, Any]) -> Iterator[Any]:
        try:
            yield group_key(row, self.key), (row["uri"], row["embedding"], row["backbone"])
        except GroupKeyError as e:
            yield beam.pvalue.TaggedOutput(ERRORS, {"uri": row["uri"], "stage": KEY_STAGE,
                                                    "error": str(e)})


class SummariseSets(beam.CombineFn):
    """A set's members (uri, embedding, backbone) -> [SetSummary, member uris, backbone].

    A set is summarised as its members arrive and partial summaries are merged (Beam
    lifts the combine before the shuffle), so no stage holds a set's features: a set
    costs O(d) floats and its member uris, whatever its size (issue 19).
    """

    def __init__(self, pool: str | None, covtrace: bool):
        self.pool, self.covtrace = pool, covtrace

    def create_accumulator(self) -> list[Any]:
        return [SetSummary(None if self.covtrace else self.pool, self.covtrace), [], None]

    def add_input(self, acc: list[Any], member: tuple[str, Any, str]) -> list[Any]:
        uri, embedding, backbone = member
        acc[0].add(embedding)
        acc[1].append(uri)
        acc[2] = acc[2] or backbone
        return acc

    def merge_accumulators(self, accs: Iterable[list[Any]]) -> list[Any]:
        accs = iter(accs)
        out = next(accs)
        for acc in accs:
            out[0].merge(acc[0])
            out[1].extend(acc[1])
            out[2] = out[2] or acc[2]
        return out

    def extract_output(self, acc: list[Any]) -> list[Any]:
        return acc


class _GroupRow(beam.DoFn):
    """(group, summary) -> an unscored group row with its pooled vector (covtrace:
    scored); the members of a set too small to score -> error rows."""

    def __init__(self, key: str, method: str, pool: str | None, partition: str):
        self.key, self.method, self.pool, self.partition = key, method, pool, partition

    def process(self, kv: tuple[str, list[Any]]) -> Iterator[Any]:
        name, (summary, uris, backbone) = kv
        uris = sorted(uris)
        if len(uris) < MIN_SET_SIZE:
            for uri in uris:
                yield beam.pvalue.TaggedOutput(ERRORS, {"uri": uri, "stage": STAGE,
                                                        "error": _too_small(name, len(uris))})
            return
        covtrace = self.method == "covtrace"
        yield {"group": name, "score": summary.covtrace() if covtrace else None,
               "rank": None, "size": len(uris), "member_uris": uris,
               "neighbor_groups": [], "neighbor_distances": [], "percentile": None,
               "method": self.method, "pool": None if covtrace else self.pool,
               "group_by": self.key, "partition": self.partition,
               "backbone": backbone, "index_id": None,
               "pooled": None if covtrace else summary.pooled(self.pool)}


def score_group_batch(groups: Sequence[dict[str, Any]], index: LoadedIndex
                      ) -> list[dict[str, Any]]:
    """Pooled group rows -> kNN-scored group rows (``rank`` still None, ``pooled`` dropped)."""
    xq = np.stack([g["pooled"] for g in groups])
    scores, D, I = index.search(xq)
    pct = index.percentile(scores)
    out = []
    for g, s, p, d, i in zip(groups, scores, pct, D, I, strict=True):
        row = {key: v for key, v in g.items() if key != "pooled"}
        out.append({**row, "score": float(s), "percentile": float(p),
                    "neighbor_groups": [index.uris[j] for j in i],
                    "neighbor_distances": [float(x) for x in d], "index_id": index.index_id})
    return out


class GroupIndexModelHandler(IndexModelHandler):
    """RunInference's view of an index of sets: pooled group rows -> kNN-scored group rows
    (score_group_batch), batched by RunInference like any model's inputs."""

    def run_inference(self, batch: Sequence[dict[str, Any]], model: LoadedIndex,
                      inference_args: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return score_group_batch(batch, model)

    def get_num_bytes(self, batch: Sequence[dict[str, Any]]) -> int:
        return sum(g["pooled"].nbytes for g in batch)


class ScoreGroups(beam.PTransform):
    """Feature rows -> (ranked group rows (group_schema), image error rows (stage 'group')).

    ``group.method`` knn needs ``index_dir`` (an index built with --group-by) and a
    ``group.pool``; covtrace needs neither.
    """

    def __init__(self, group: GroupConfig, *, index_dir: str | None = None,
                 partition: str = "", batch_size: int = 256,
                 search: SearchConfig = SearchConfig()):
        super().__init__()
        if not group.covtrace and (not index_dir or group.pool not in POOLS):
            raise ValueError("kNN group scoring needs an index built with --group-by and a pool")
        self.group, self.index_dir, self.partition = group, index_dir, partition
        self.handler = GroupIndexModelHandler(
            index_dir, partition=partition, search=search, max_batch_size=batch_size)

    def expand(self, rows):
        g = self.group
        keyed = rows | "Key" >> beam.ParDo(_KeyRows(g.group_by)).with_outputs(ERRORS,
                                                                               main="rows")
        pooled = (keyed.rows
                  | "Summarise" >> beam.CombinePerKey(SummariseSets(g.pool, g.covtrace))
                  | "Pool" >> beam.ParDo(_GroupRow(g.group_by, g.method, g.pool,
                                                   self.partition)
                                         ).with_outputs(ERRORS, main="groups"))
        groups = pooled.groups
        if not g.covtrace:
            groups = groups | "Knn" >> RunInference(self.handler)
        else:
            groups = groups | "DropPooled" >> beam.Map(
                lambda r: {k: v for k, v in r.items() if k != "pooled"})
        errors = (keyed[ERRORS], pooled[ERRORS]) | "Errors" >> beam.Flatten()
        return groups | "Rank" >> RankByScore(), errors
