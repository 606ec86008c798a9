"""What the report shows: the rows, groups, facts and numbers, chosen from its inputs.

The page's size is bounded whatever the partition size: only the ``top``
anomalies (each beside its nearest normal neighbours), a seeded random
``sample`` of the other rows, the member thumbnails of the top groups, a capped
errors table and two fixed-size plots. Values here are plain Python data; the
template escapes them all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dn2ops.report.inputs import Removed, ReportInputs

# Rows of the errors table that are embedded; the rest are only counted.
MAX_ERROR_ROWS = 500
# Distinct (stage, reason) pairs listed in the summary.
MAX_ERROR_REASONS = 20
# Member thumbnails shown per group; a group can have thousands of members.
MAX_GROUP_MEMBER_THUMBS = 4
# Neighbour groups named per group.
MAX_NEIGHBOR_GROUPS = 5
# The sample is drawn with a fixed seed so two renders of the same results
# are byte-identical and a reader can refer to "the third sample image".
SAMPLE_SEED = 0

_ANOMALOUS = frozenset({"1", "true", "anomaly", "anomalous"})
_NORMAL = frozenset({"0", "false", "normal"})


@dataclass(frozen=True)
class Roc:
    """Scores against ground truth; ``auc``, ``fpr`` and ``tpr`` are None without both classes."""

    n_pos: int
    n_neg: int
    n_left_out: int
    auc: float | None = None
    fpr: np.ndarray | None = None
    tpr: np.ndarray | None = None


def label_is_anomalous(value: Any) -> bool | None:
    """Map a ground-truth label to True (anomalous), False (normal) or None (unknown).

    Anomalous: 1, True, "anomaly", "anomalous" (and "1"/"true", as CSV
    manifests carry strings). Normal: 0, False, "normal" ("0"/"false").
    Anything else, including null and NaN, is unknown.
    """
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return True if value == 1 else False if value == 0 else None
    text = str(value).strip().lower()
    if text in _ANOMALOUS:
        return True
    if text in _NORMAL:
        return False
    return None


def select_rows(
    anomalies: pa.Table, top: int, sample: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The top rows, flagged ones first, then by rank; and a seeded random sample of the
    rest (in the same order).

    Rows are first put in a canonical order (flagged, rank, then uri) so the result
    does not depend on how rows were spread over shards. (dn2 flags every row at or above
    a score threshold, so its flagged rows are its best ranked anyway.)
    """
    if len(anomalies) == 0:
        return [], []
    keys = [("rank", "ascending"), ("uri", "ascending")]
    if "flagged" in anomalies.column_names:
        keys.insert(0, ("flagged", "descending"))
    order = pc.sort_indices(anomalies, sort_keys=keys).to_numpy()  # nulls last
    n_top = min(top, len(order))
    rest = order[n_top:]
    rng = np.random.default_rng(SAMPLE_SEED)
    picked = np.sort(rng.choice(len(rest), size=min(sample, len(rest)), replace=False))
    top_rows = anomalies.take(order[:n_top]).to_pylist()
    sample_rows = anomalies.take(rest[picked]).to_pylist()
    return top_rows, sample_rows


def top_groups(groups: pa.Table | None, top: int) -> list[dict[str, Any]]:
    """The ``top`` groups by rank (then name), as dicts."""
    if groups is None or len(groups) == 0:
        return []
    keys = [(c, "ascending") for c in ("rank", "group") if c in groups.column_names]
    order = pc.sort_indices(groups, sort_keys=keys).to_numpy() if keys else np.arange(len(groups))
    return groups.take(order[:top]).to_pylist()


def uris_to_show(
    top_rows: Iterable[Mapping[str, Any]],
    sample_rows: Iterable[Mapping[str, Any]],
    groups: Iterable[Mapping[str, Any]],
) -> list[str]:
    """Every distinct image uri the report embeds, in first-use order."""
    uris: dict[str, None] = {}
    for row in top_rows:
        uris[row["uri"]] = None
        uris.update(dict.fromkeys(row.get("neighbor_uris") or []))
    for row in sample_rows:
        uris[row["uri"]] = None
    for group in groups:
        uris.update(dict.fromkeys((group.get("member_uris") or [])[:MAX_GROUP_MEMBER_THUMBS]))
    uris.pop(None, None)
    return list(uris)


def neighbours(row: Mapping[str, Any]) -> list[tuple[str, float | None]]:
    """(uri, distance) of a row's nearest normal images, nearest first."""
    uris = row.get("neighbor_uris") or []
    dists = list(row.get("neighbor_distances") or [])
    dists += [None] * (len(uris) - len(dists))
    return list(zip(uris, dists, strict=False))


def group_view(group: Mapping[str, Any]) -> dict[str, Any]:
    """A group row as shown: a few members, and the names of its nearest normal groups."""
    members = list(group.get("member_uris") or [])
    named = list(group.get("neighbor_groups") or [])
    return {
        **{key: group.get(key) for key in ("rank", "group", "score", "size")},
        "members": members[:MAX_GROUP_MEMBER_THUMBS],
        "more": max(len(members) - MAX_GROUP_MEMBER_THUMBS, 0),
        "neighbours": named[:MAX_NEIGHBOR_GROUPS],
        "more_neighbours": len(named) > MAX_NEIGHBOR_GROUPS,
    }


def summary_facts(inputs: ReportInputs, results_dir: str) -> list[tuple[str, Any]]:
    """The summary's key facts; counts fall back to the tables without summary.json."""
    s = inputs.summary or {}
    n_rows, n_err = len(inputs.anomalies), len(inputs.errors)
    return [
        ("results", results_dir),
        ("partition", s.get("partition")),
        ("backbone", s.get("backbone")),
        ("index_id", s.get("index_id")),
        ("index_dir", s.get("index_dir")),
        ("input", s.get("input")),
        ("created_at", s.get("created_at")),
        ("count_in", s.get("count_in", n_rows + n_err)),
        ("scored", s.get("scored", n_rows)),
        ("errored", s.get("errored", n_err)),
    ]


def flag_sentence(summary: Mapping[str, Any] | None) -> str | None:
    """What ``flagged`` means in these results, from summary.json's ``flags``; None when
    the results predate flags."""
    flags = (summary or {}).get("flags")
    if not flags:
        return None
    if flags.get("rule") is None:
        return f"Nothing is flagged: {flags.get('why')}."
    level, n = f"{100 * flags['level']:g} %", flags["flagged"]
    threshold = flags.get("threshold")
    count = f"{n:,} flagged" + (f" (scores >= {threshold:.4g})" if threshold is not None else "")
    if flags["rule"] == "fdr":
        return (f"Flagged: Benjamini–Hochberg at {level}: among flagged images, at most "
                f"{level} are expected to be normal ones; {count}.")
    return (f"Flagged: p-value <= {flags['level']:g}: a normal image is flagged with "
            f"chance {level}; {count}.")


def summary_notes(inputs: ReportInputs) -> list[str]:
    """Notes under the facts: what was missing, and where summary and tables disagree."""
    notes = list(inputs.notes)
    said, n_rows = (inputs.summary or {}).get("scored"), len(inputs.anomalies)
    if inputs.summary is not None and said not in (None, n_rows):
        notes.append(f"summary says scored={said} but the tables hold {n_rows} rows.")
    return notes


def errors_by_stage(inputs: ReportInputs) -> list[tuple[str, int]]:
    """(stage, count), from the summary or else the errors table, sorted by stage."""
    by_stage = (inputs.summary or {}).get("errors_by_stage") or dict(
        Counter(column(inputs.errors, "stage"))
    )
    return sorted(by_stage.items())


def error_reasons(errors: pa.Table) -> tuple[list[tuple[Any, Any, int]], int]:
    """The most common (stage, reason, count), most frequent first; and how many more."""
    pairs = Counter(zip(column(errors, "stage"), column(errors, "error"), strict=True))
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], str(kv[0])))
    shown = [(stage, reason, n) for (stage, reason), n in ranked[:MAX_ERROR_REASONS]]
    return shown, max(len(ranked) - MAX_ERROR_REASONS, 0)


def error_rows(errors: pa.Table) -> list[dict[str, Any]]:
    """The first MAX_ERROR_ROWS error rows by stage, then uri."""
    if len(errors) == 0:
        return []
    keys = [(c, "ascending") for c in ("stage", "uri") if c in errors.column_names]
    order = pc.sort_indices(errors, sort_keys=keys).to_numpy()[:MAX_ERROR_ROWS]
    return errors.take(order).to_pylist()


def roc(anomalies: pa.Table, label_column: str) -> Roc:
    """ROC of the scores (higher = more anomalous) against the label column."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = [label_is_anomalous(v) for v in anomalies[label_column].to_pylist()]
    scores = column_numpy(anomalies, "score")
    keep = np.array([lab is not None for lab in labels], dtype=bool) & np.isfinite(scores)
    y = np.array([lab is True for lab in labels], dtype=bool)[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    counts = Roc(n_pos, n_neg, len(labels) - n_pos - n_neg)
    if n_pos == 0 or n_neg == 0:
        return counts
    fpr, tpr, _ = roc_curve(y, scores[keep])
    return Roc(n_pos, n_neg, counts.n_left_out, float(roc_auc_score(y, scores[keep])), fpr, tpr)


def finite_scores(values: np.ndarray | None) -> np.ndarray | None:
    """Drop NaN and infinite values (None stays None)."""
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def column(table: pa.Table, name: str) -> list[Any]:
    """A column as a Python list; all None when the column is missing."""
    if name in table.column_names:
        return table[name].to_pylist()
    return [None] * len(table)


def column_numpy(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 (n,) with nulls as NaN."""
    if name not in table.column_names or len(table) == 0:
        return np.array([], dtype=np.float64)
    col = pc.cast(table[name], pa.float64())
    return pc.fill_null(col, float("nan")).to_numpy().astype(np.float64)



def removed_view(removed: Removed | None) -> dict[str, Any] | None:
    """"Removed from the normal set": what the index's cleaning removed and by which rule,
    with the most suspicious of the removed images; None (no section) without one."""
    if removed is None:
        return None
    view = {"where": removed.where, "rows": removed.rows, "n": removed.n}
    if removed.cleaning is None:
        return {**view, "sentences": [
            f"The normal index could not be read here ({removed.why}).",
            "What its cleaning removed, if anything, is listed in"]}
    return {**view, "sentences": [*cleaning_sentences(removed.cleaning, removed.n),
                                  "The removed images are listed in"]}


def cleaning_sentences(c: Mapping[str, Any], n: int) -> list[str]:
    """An index manifest's ``cleaning`` entry (dn2ops.index.cleaning) in words; ``n`` images
    were removed when the index was built (its entry's own count when it has one)."""
    n = c.get("removed", n)
    if c.get("rule") == "auto":
        sample = f", scored against a sample of {c['sample']:,}" if c.get("sample") else ""
        out = [f"The auto rule removed {n:,} of {c.get('of', 0):,} normal images (estimated "
               f"contamination {100 * (c.get('estimated_rate') or 0):.1f} %): their cleaning "
               f"score (the log of the mean distance to their {c.get('k_c')} nearest other "
               f"normal images) was more than {c.get('z')} robust standard deviations above the "
               f"median (threshold {_num(c.get('threshold'))}; {c.get('rounds')} round(s)"
               f"{sample})."]
    elif c.get("rule") == "fraction":
        out = [f"--clean-fraction {c.get('fraction')} removed the {n:,} normal images with the "
               f"highest leave-one-out score over {c.get('clean_k') or 'their'} neighbours "
               f"(threshold {_num(c.get('threshold'))})."]
    else:
        out = [f"Nothing was removed by cleaning ({c.get('rule')}): {c.get('why', '')}."]
    added = c.get("added")
    if added:
        how = f"({added['why']})" if added.get("why") else "(above the parent's threshold)"
        out.append(f"Of the {added['of']:,} images added by --add, {added['removed']:,} were "
                   f"removed {how}.")
    return out


def _num(value: Any) -> str:
    return "–" if value is None else f"{float(value):.4g}"
