"""Reading what a report shows: a committed results directory and the normal index.

Tables are read through `dn2ops.io.features` (shard listing and Parquet reads), so
the report takes exactly the shards that the directory's commit vouches for.
Only the columns the report uses are read; every score is used, but only
through the plots.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dn2ops.errors import UserError
from dn2ops.io import features, outputs

RESULTS_KIND = "results"
INDEX_KIND = "index"
# Columns read from the anomalies tables (others, e.g. the embeddings'
# provenance, stay on disk); the label column is added.
ANOMALY_COLUMNS = ("uri", "score", "rank", "percentile", "neighbor_uris", "neighbor_distances",
                   "p_value", "flagged")
# Read after the label column where the results have them (--explain: the heatmaps).
HEATMAP_COLUMNS = ("heatmap_uri", "hot_box")
ERROR_COLUMNS = ("uri", "stage", "error")
# Removed normal images shown (most suspicious first); the rest are counted.
MAX_REMOVED = 24


class NoNormalScores(UserError, FileNotFoundError):
    """An index directory named for the report holds no ``normal.parquet``."""


@dataclass
class ReportInputs:
    """Everything read from a results directory (and the index, if any).

    ``anomalies``: one row per scored image (`ANOMALY_COLUMNS` and the label
    column when present); ``errors``: uri, stage, error; ``groups``: the group
    tables' rows, None when the results hold none; ``normal_loo``: the normal
    set's leave-one-out scores (n_normal,), higher = more anomalous, or None.
    """

    summary: dict[str, Any] | None
    anomalies: pa.Table
    errors: pa.Table
    groups: pa.Table | None
    normal_loo: np.ndarray | None
    index_note: str
    notes: list[str] = field(default_factory=list)
    removed: Removed | None = None


@dataclass
class Removed:
    """The normal images the index's cleaning removed (normal.parquet, kept = false).

    ``where``: INDEX_DIR/normal.parquet, the full list; ``cleaning``: the manifest's
    ``cleaning`` entry (None when the index could not be read, and ``why`` says why);
    ``rows``: uri and clean_score of at most MAX_REMOVED of them, highest clean_score
    (most suspicious) first; ``n``: how many were removed.
    """

    where: str
    cleaning: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    n: int = 0
    why: str = ""


def read_inputs(results_dir: str, index_dir: str | None, label_column: str) -> ReportInputs:
    """Read the results tables, summary and (optional) normal scores.

    Raises:
        dn2ops.io.outputs.OutputError: ``results_dir`` does not exist or was not
            committed (no ``_SUCCESS`` marker: a run stopped mid-way), or
            holds another kind of dn2 output.
        NoNormalScores: an explicit ``index_dir`` has no ``normal.parquet`` (a
            FileNotFoundError).
    """
    outputs.require_complete(results_dir, RESULTS_KIND)
    summary = _read_summary(results_dir)
    anomalies = _read(results_dir, "anomalies", (*ANOMALY_COLUMNS, label_column,
                                                 *HEATMAP_COLUMNS))
    errors = _read(results_dir, "errors", ERROR_COLUMNS)
    groups = features.read_table(results_dir, "groups")
    normal_loo, index_note = read_normal_scores(index_dir, summary)
    inputs = ReportInputs(summary, _conform(anomalies, empty_anomalies()),
                          _conform(errors, empty_errors()), groups, normal_loo, index_note)
    inputs.removed = read_removed(index_dir, summary)
    if summary is None:
        inputs.notes.append("summary.json not found; counts below come from the tables.")
    return inputs


def _read(directory: str, prefix: str, wanted: Sequence[str]) -> pa.Table | None:
    """The ``prefix`` table with those of ``wanted`` columns that exist; None if no shards."""
    names = features.column_names(directory, prefix)
    return features.read_table(directory, prefix, columns=[c for c in wanted if c in names])


def _conform(table: pa.Table | None, empty: pa.Table) -> pa.Table:
    """``table`` with every column of ``empty`` (absent ones all null); ``empty`` for None."""
    if table is None:
        return empty
    for f in empty.schema:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(len(table), f.type))
    return table


def _read_summary(results_dir: str) -> dict[str, Any] | None:
    """Parse ``summary.json``; None when absent."""
    fs, path = outputs.fs_and_path(results_dir)
    summary = outputs.join(path, "summary.json")
    if not fs.exists(summary):
        return None
    return json.loads(fs.cat_file(summary).decode("utf-8"))


def empty_anomalies() -> pa.Table:
    """The anomalies table of a partition where nothing was scored."""
    return pa.table(
        {
            "uri": pa.array([], pa.string()),
            "score": pa.array([], pa.float64()),
            "rank": pa.array([], pa.int64()),
            "percentile": pa.array([], pa.float64()),
            "neighbor_uris": pa.array([], pa.list_(pa.string())),
            "neighbor_distances": pa.array([], pa.list_(pa.float64())),
            "p_value": pa.array([], pa.float64()),
            "flagged": pa.array([], pa.bool_()),
        }
    )


def empty_errors() -> pa.Table:
    """The errors table of a partition without errors."""
    return pa.table({c: pa.array([], pa.string()) for c in ERROR_COLUMNS})


def read_normal_scores(
    index_dir: str | None, summary: Mapping[str, Any] | None
) -> tuple[np.ndarray | None, str]:
    """The normal set's leave-one-out scores (n,), and a note saying where they came from.

    An explicit ``index_dir`` must be a committed index holding
    ``normal.parquet``; the one named in the summary is used only when it is
    reachable and committed, since a report is often rendered far from where
    the index lives.
    """
    if index_dir is None:
        named = (summary or {}).get("index_dir")
        if not named:
            return None, "no index given; showing this partition's scores only."
        unusable = _unusable_index(named)
        if unusable:
            return None, unusable
        index_dir = named
    else:
        outputs.require_complete(index_dir, INDEX_KIND)
    return _kept_loo_scores(index_dir), f"normal set: {index_dir}"


def _unusable_index(named: str) -> str:
    """Why the index named in summary.json cannot be used here ("" when it can)."""
    try:
        outputs.require_complete(named, INDEX_KIND)
    except outputs.OutputError as exc:
        return f"index not usable here ({exc}); showing this partition only."
    except (OSError, ValueError, ImportError) as exc:
        # e.g. a gs:// index on a machine without gcsfs or credentials.
        return f"index {named} not reachable ({exc}); partition only."
    return ""


def _kept_loo_scores(index_dir: str) -> np.ndarray:
    """``loo_score`` of the images kept in the index, from its ``normal.parquet``."""
    fs, path = outputs.fs_and_path(index_dir)
    normal_path = outputs.join(path, "normal.parquet")
    if not fs.exists(normal_path):
        raise NoNormalScores(f"index dir has no normal.parquet: {index_dir}")
    with fs.open(normal_path, "rb") as f:
        table = pq.read_table(f, columns=["loo_score", "kept"])
    # Percentiles are against the images that made it into the index;
    # dropped duplicates would count twice.
    table = table.filter(pc.fill_null(table["kept"], False))
    return table["loo_score"].to_numpy(zero_copy_only=False).astype(np.float64)


def read_removed(index_dir: str | None, summary: Mapping[str, Any] | None,
                 cap: int = MAX_REMOVED) -> Removed | None:
    """The normal images the index (``index_dir``, else summary.json's) removed when it was
    cleaned; None when there is no index or it was not cleaned. An index named in the
    summary that cannot be read here gives only where the list is, and why."""
    named = index_dir or (summary or {}).get("index_dir")
    if not named:
        return None
    where = outputs.join(named, "normal.parquet")
    unusable = "" if index_dir else _unusable_index(named)
    if unusable:
        return Removed(where, why=unusable)
    manifest = outputs.read_marker(named) or {}
    cleaning = manifest.get("cleaning") or (
        {"rule": "fraction", "fraction": manifest["clean_fraction"]}
        if isinstance(manifest.get("clean_fraction"), float) and manifest["clean_fraction"] > 0
        else None)  # an index built before the cleaning entry was recorded
    if cleaning is None or cleaning.get("rule") == "off":
        return None
    removed = _removed_rows(named)
    keys = [("clean_score", "descending"), ("uri", "ascending")]
    order = pc.sort_indices(removed, sort_keys=keys).to_numpy()  # nulls (and NaN) last
    return Removed(where, cleaning, removed.take(order[:cap]).to_pylist(), len(removed))


def _removed_rows(index_dir: str) -> pa.Table:
    """uri and clean_score (null before it was recorded) of normal.parquet's removed rows."""
    fs, path = outputs.fs_and_path(index_dir)
    with fs.open(outputs.join(path, "normal.parquet"), "rb") as f:
        normal = pq.ParquetFile(f)
        columns = [c for c in ("uri", "kept", "clean_score") if c in normal.schema_arrow.names]
        table = normal.read(columns=columns)
    table = table.filter(pc.invert(pc.fill_null(table["kept"], True)))
    if "clean_score" not in table.column_names:
        table = table.append_column("clean_score", pa.nulls(len(table), pa.float64()))
    return table.select(["uri", "clean_score"])
