"""Render a DN2 results directory as one self-contained HTML report.

The report is meant to be mailed or served from a bucket, so it is a single
file: every image (thumbnails and plots) is embedded as a base64 ``data:``
URI and there is no external CSS or JavaScript.

Its size is bounded whatever the partition size: only the ``top`` anomalies
(each beside its nearest normal neighbours), a seeded random ``sample`` of
the other rows, the member thumbnails of the top groups, a capped errors
table and two fixed-size plots are embedded. Every score is used, but only
through the histogram and ROC plots.

Sections, each a ``<section id=...>``: ``summary``, ``histogram``, ``top``,
``sample``, ``groups`` (only when group tables exist), ``roc`` (only when the
results carry the label column) and ``errors``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import posixpath
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from matplotlib.figure import Figure

from dn2ops import outputs
from dn2ops.images import load_image

__all__ = ["label_is_anomalous", "render_report", "write_report"]

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
JPEG_QUALITY = 80
# Concurrent thumbnail reads: object stores answer one small read in tens of
# milliseconds, and a report fetches a few hundred images.
FETCH_WORKERS = 16
HIST_BINS = 60
# Reasons are shown in a fixed-size placeholder cell.
_MAX_REASON_CHARS = 160

_ANOMALOUS = frozenset({"1", "true", "anomaly", "anomalous"})
_NORMAL = frozenset({"0", "false", "normal"})

# Columns the report reads from the anomalies tables (others, e.g. the
# embeddings' provenance, are left on disk); the label column is added.
_ANOMALY_COLUMNS = ("uri", "score", "rank", "percentile", "neighbor_uris", "neighbor_distances")


@dataclass
class _Inputs:
    """Everything read from a results directory (and the index, if any)."""

    summary: dict[str, Any] | None
    anomalies: pa.Table
    errors: pa.Table
    groups: pa.Table | None
    normal_loo: np.ndarray | None
    index_note: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Thumb:
    """A thumbnail ready to embed, or the reason there is none."""

    data_uri: str | None
    reason: str = ""


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def render_report(
    results_dir: str,
    *,
    index_dir: str | None = None,
    top: int = 20,
    sample: int = 200,
    label_column: str = "label",
    thumb_px: int = 96,
) -> str:
    """Render the results in ``results_dir`` as one self-contained HTML document.

    Args:
        results_dir: local path or fsspec URL of a ``dn2 score`` output
            (``anomalies-*.parquet``, ``errors-*.parquet``, optional
            ``groups-*.parquet``, ``summary.json``).
        index_dir: the normal index whose ``normal.parquet`` leave-one-out
            scores are drawn under the partition's in the histogram. When
            None, ``summary.json``'s ``index_dir`` is used if it exists.
        top: how many of the most anomalous images (and groups) to show,
            each beside its nearest normal neighbours.
        sample: how many of the other scored images to show, drawn at
            random with a fixed seed.
        label_column: column holding ground truth (1/True/"anomaly"/
            "anomalous" vs 0/False/"normal"); when present a ROC curve and
            ROC-AUC are shown.
        thumb_px: thumbnails fit in a ``thumb_px`` x ``thumb_px`` box.

    Returns:
        The HTML document as a string.

    Raises:
        FileNotFoundError: ``results_dir`` does not exist or holds no
            results, or an explicit ``index_dir`` has no ``normal.parquet``.
        ValueError: a negative ``top``/``sample`` or non-positive ``thumb_px``.
    """
    if top < 0 or sample < 0:
        raise ValueError(f"top and sample must be >= 0, got top={top}, sample={sample}")
    if thumb_px < 1:
        raise ValueError(f"thumb_px must be >= 1, got {thumb_px}")
    inputs = _read_inputs(results_dir, index_dir, label_column)
    top_rows, sample_rows = _select_rows(inputs.anomalies, top, sample)
    top_groups = _top_groups(inputs.groups, top)
    thumbs = _make_thumbs(_uris_to_show(top_rows, sample_rows, top_groups), thumb_px)

    sections = [
        _summary_section(inputs, results_dir),
        _histogram_section(inputs),
        _top_section(top_rows, thumbs, label_column, top),
        _sample_section(sample_rows, thumbs, len(inputs.anomalies), sample),
    ]
    if inputs.groups is not None:
        sections.append(_groups_section(top_groups, len(inputs.groups), thumbs))
    if label_column in inputs.anomalies.column_names:
        sections.append(_roc_section(inputs.anomalies, label_column))
    sections.append(_errors_section(inputs.errors))
    return _page(_title(inputs.summary, results_dir), sections, thumb_px)


def write_report(results_dir: str, output: str | None = None, **kw: Any) -> str:
    """Render ``results_dir`` (see `render_report`) and write the HTML.

    On local disk the file is written under a temporary name beside ``output``
    and then moved into place, so a reader never sees a half-written report; an
    object store's upload is already all-or-nothing (and has no rename).

    Args:
        results_dir: local path or fsspec URL of the results.
        output: where to write; defaults to ``results_dir/report.html``.
        **kw: passed on to `render_report`.

    Returns:
        The path written, spelled like ``output``.
    """
    document = render_report(results_dir, **kw)
    if output is None:
        output = f"{results_dir.rstrip('/')}/report.html"
    fs, path = fsspec.core.url_to_fs(output)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, document.encode("utf-8"))
        return output
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    fs.pipe_file(tmp, document.encode("utf-8"))
    try:
        fs.mv(tmp, path)
    except BaseException:
        # Don't leave a stray temp file beside a report that never landed.
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    return output


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
        if value == 1:
            return True
        if value == 0:
            return False
        return None
    text = str(value).strip().lower()
    if text in _ANOMALOUS:
        return True
    if text in _NORMAL:
        return False
    return None


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def _read_inputs(results_dir: str, index_dir: str | None, label_column: str) -> _Inputs:
    """Read the results tables, summary and (optional) normal scores."""
    fs, base = fsspec.core.url_to_fs(results_dir)
    base = base.rstrip("/")
    if not fs.isdir(base):
        raise FileNotFoundError(f"results dir not found: {results_dir}")
    listed = _committed_files(results_dir)
    summary = _read_summary(fs, base)
    anomaly_paths = _shards(fs, base, "anomalies", listed)
    error_paths = _shards(fs, base, "errors", listed)
    group_paths = _shards(fs, base, "groups", listed)
    if summary is None and not anomaly_paths and not error_paths:
        raise FileNotFoundError(
            f"{results_dir} holds no summary.json, anomalies-*.parquet or "
            "errors-*.parquet: not a dn2 results dir"
        )
    wanted = (*_ANOMALY_COLUMNS, label_column)
    anomalies = _read_tables(fs, anomaly_paths, wanted, _empty_anomalies())
    errors = _read_tables(fs, error_paths, ("uri", "stage", "error"), _empty_errors())
    groups = _read_tables(fs, group_paths, None, None) if group_paths else None
    normal_loo, index_note = _read_normal_scores(index_dir, summary)
    inputs = _Inputs(summary, anomalies, errors, groups, normal_loo, index_note)
    if summary is None:
        inputs.notes.append("summary.json not found; counts below come from the tables.")
    return inputs


def _read_summary(fs: fsspec.AbstractFileSystem, base: str) -> dict[str, Any] | None:
    """Parse ``summary.json``; None when absent."""
    path = f"{base}/summary.json"
    if not fs.exists(path):
        return None
    return json.loads(fs.cat_file(path).decode("utf-8"))


def _committed_files(results_dir: str) -> list[str] | None:
    """The files ``_SUCCESS`` lists (dn2ops.outputs); None for tables dn2 did not commit."""
    if outputs.read_marker(results_dir) is not None:
        return outputs.committed_files(results_dir)
    if outputs.read_marker(results_dir, outputs.COMMITTING) is not None:
        raise FileNotFoundError(f"{results_dir} is being replaced, or its run stopped "
                                "mid-commit: not a complete dn2 results dir; run it again")
    return None


def _shards(fs: fsspec.AbstractFileSystem, base: str, prefix: str,
            listed: list[str] | None) -> list[str]:
    """Sorted paths of the ``prefix-*.parquet`` shards (sorted: stable row order): those
    ``_SUCCESS`` lists, or, in a directory dn2 did not commit, those found there."""
    if listed is None:
        return sorted(fs.glob(f"{base}/{prefix}-*.parquet"))
    return [f"{base}/{name}" for name in outputs.matching(listed, f"{prefix}-*.parquet")]


def _read_parquet(fs: fsspec.AbstractFileSystem, path: str,
                  columns: Sequence[str] | None) -> pa.Table:
    """One Parquet file's ``columns`` that exist (all if None). The file is opened and
    closed here: gcsfs leaves a prefetch task pending on a file pyarrow never closes."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        return pf.read(columns=names if columns is None else [c for c in columns if c in names])


def _read_tables(
    fs: fsspec.AbstractFileSystem,
    paths: Sequence[str],
    columns: Sequence[str] | None,
    empty: pa.Table | None,
) -> pa.Table:
    """Concatenate the parquet shards at ``paths``, keeping ``columns`` that exist.

    Shards are read one by one (not as one dataset) because a shard written
    by a worker that saw no rows can carry null-typed columns; concatenating
    with type promotion absorbs that.
    """
    tables = []
    for path in paths:
        tables.append(_read_parquet(fs, path, columns))
    if not tables:
        return empty if empty is not None else pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


def _empty_anomalies() -> pa.Table:
    """The anomalies table of a partition where nothing was scored."""
    return pa.table(
        {
            "uri": pa.array([], pa.string()),
            "score": pa.array([], pa.float64()),
            "rank": pa.array([], pa.int64()),
            "percentile": pa.array([], pa.float64()),
            "neighbor_uris": pa.array([], pa.list_(pa.string())),
            "neighbor_distances": pa.array([], pa.list_(pa.float64())),
        }
    )


def _empty_errors() -> pa.Table:
    """The errors table of a partition without errors."""
    return pa.table({c: pa.array([], pa.string()) for c in ("uri", "stage", "error")})


def _read_normal_scores(
    index_dir: str | None, summary: Mapping[str, Any] | None
) -> tuple[np.ndarray | None, str]:
    """The normal set's leave-one-out scores, and a note saying where they came from.

    An explicit ``index_dir`` must hold ``normal.parquet``; the one named in
    the summary is used only when it is reachable, since a report is often
    rendered far from where the index lives.
    """
    if index_dir is None:
        named = (summary or {}).get("index_dir")
        if not named:
            return None, "no index given; showing this partition's scores only."
        try:
            fs, path = fsspec.core.url_to_fs(named)
            reachable = fs.exists(f"{path.rstrip('/')}/normal.parquet")
        except (OSError, ValueError, ImportError) as exc:
            # e.g. a gs:// index on a machine without gcsfs or credentials.
            return None, f"index {named} not reachable ({exc}); partition only."
        if not reachable:
            return None, f"index {named} not found here; showing this partition only."
        index_dir = named
    fs, path = fsspec.core.url_to_fs(index_dir)
    normal_path = f"{path.rstrip('/')}/normal.parquet"
    if not fs.exists(normal_path):
        raise FileNotFoundError(f"index dir has no normal.parquet: {index_dir}")
    table = _read_parquet(fs, normal_path, ("loo_score", "kept"))
    if "loo_score" not in table.column_names:
        raise ValueError(f"{index_dir}/normal.parquet has no loo_score column")
    if "kept" in table.column_names:
        # Percentiles are against the images that made it into the index;
        # dropped duplicates would count twice.
        table = table.filter(pc.fill_null(table["kept"], False))
    scores = table["loo_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    return scores, f"normal set: {index_dir}"


# --------------------------------------------------------------------------
# Choosing what to show
# --------------------------------------------------------------------------


def _select_rows(
    anomalies: pa.Table, top: int, sample: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The top rows by rank, and a seeded random sample of the rest (in rank order).

    Rows are first put in a canonical order (rank, then uri) so the result
    does not depend on how rows were spread over shards.
    """
    if len(anomalies) == 0:
        return [], []
    order = pc.sort_indices(
        anomalies, sort_keys=[("rank", "ascending"), ("uri", "ascending")]
    ).to_numpy()
    n_top = min(top, len(order))
    rest = order[n_top:]
    rng = np.random.default_rng(SAMPLE_SEED)
    picked = np.sort(rng.choice(len(rest), size=min(sample, len(rest)), replace=False))
    top_rows = anomalies.take(order[:n_top]).to_pylist()
    sample_rows = anomalies.take(rest[picked]).to_pylist()
    return top_rows, sample_rows


def _top_groups(groups: pa.Table | None, top: int) -> list[dict[str, Any]]:
    """The ``top`` groups by rank (then name), as dicts."""
    if groups is None or len(groups) == 0:
        return []
    keys = [(c, "ascending") for c in ("rank", "group") if c in groups.column_names]
    order = pc.sort_indices(groups, sort_keys=keys).to_numpy() if keys else np.arange(len(groups))
    return groups.take(order[:top]).to_pylist()


def _uris_to_show(
    top_rows: Iterable[Mapping[str, Any]],
    sample_rows: Iterable[Mapping[str, Any]],
    top_groups: Iterable[Mapping[str, Any]],
) -> list[str]:
    """Every distinct image uri the report embeds, in first-use order."""
    uris: dict[str, None] = {}
    for row in top_rows:
        uris[row["uri"]] = None
        uris.update(dict.fromkeys(row.get("neighbor_uris") or []))
    for row in sample_rows:
        uris[row["uri"]] = None
    for group in top_groups:
        uris.update(dict.fromkeys((group.get("member_uris") or [])[:MAX_GROUP_MEMBER_THUMBS]))
    uris.pop(None, None)
    return list(uris)


# --------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------


def _make_thumbs(uris: Sequence[str], thumb_px: int) -> dict[str, _Thumb]:
    """Read and encode each uri once, concurrently; a failure becomes a reason."""
    if not uris:
        return {}
    with ThreadPoolExecutor(max_workers=FETCH_WORKERS) as pool:
        thumbs = pool.map(lambda uri: _thumb(uri, thumb_px), uris)
        return dict(zip(uris, thumbs, strict=True))


def _thumb(uri: str, thumb_px: int) -> _Thumb:
    """Read the image at ``uri`` and encode a JPEG thumbnail as a data: URI."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
        image = load_image(data)
        image.thumbnail((thumb_px, thumb_px))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    # Broad on purpose: one unreadable image (missing, corrupt, permission,
    # a storage client's own exception types) must cost one cell, never the
    # whole report.
    except Exception as exc:  # noqa: BLE001
        return _Thumb(None, _reason(exc))
    return _Thumb("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))


def _reason(exc: BaseException) -> str:
    """A short, human-readable reason for a failed thumbnail."""
    if isinstance(exc, FileNotFoundError):
        text = "file not found"
    else:
        text = str(exc) or type(exc).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 1] + "…"


def _thumb_html(uri: str, thumbs: Mapping[str, _Thumb], caption: str, css: str = "") -> str:
    """A figure with the thumbnail (or a placeholder with the reason) and a caption."""
    thumb = thumbs.get(uri) or _Thumb(None, "not loaded")
    uri_e = html.escape(uri or "")
    if thumb.data_uri is not None:
        body = f'<img class="thumb" src="{thumb.data_uri}" alt="{uri_e}" title="{uri_e}">'
    else:
        body = (
            f'<div class="thumb missing" title="{uri_e}">image unavailable<br>'
            f"<small>{html.escape(thumb.reason)}</small></div>"
        )
    return f'<figure class="{css}">{body}<figcaption>{caption}</figcaption></figure>'


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


def _summary_section(inputs: _Inputs, results_dir: str) -> str:
    """Counts, provenance, timings and errors by stage and reason."""
    s = inputs.summary or {}
    n_rows, n_err = len(inputs.anomalies), len(inputs.errors)
    facts = [
        ("results", results_dir),
        ("partition", s.get("partition", _single_value(inputs.anomalies, "partition"))),
        ("backbone", s.get("backbone")),
        ("index_id", s.get("index_id")),
        ("index_dir", s.get("index_dir")),
        ("input", s.get("input")),
        ("created_at", s.get("created_at")),
        ("count_in", s.get("count_in", n_rows + n_err)),
        ("scored", s.get("scored", n_rows)),
        ("errored", s.get("errored", n_err)),
    ]
    notes = list(inputs.notes)
    if inputs.summary is not None and s.get("scored") not in (None, n_rows):
        notes.append(f"summary says scored={s.get('scored')} but the tables hold {n_rows} rows.")
    by_stage = s.get("errors_by_stage") or dict(Counter(_column(inputs.errors, "stage")))
    parts = [
        "<h2>Summary</h2>",
        _kv_table(facts),
        *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
        "<h3>Timings</h3>",
        _kv_table([(k, _fmt_seconds(v)) for k, v in (s.get("timings") or {}).items()])
        if s.get("timings")
        else "<p>No timings recorded.</p>",
        "<h3>Errors by stage</h3>",
        _kv_table(sorted(by_stage.items())) if by_stage else "<p>No errors.</p>",
        _reasons_table(inputs.errors),
    ]
    return _section("summary", parts)


def _reasons_table(errors: pa.Table) -> str:
    """The most common (stage, reason) pairs, most frequent first."""
    if len(errors) == 0:
        return ""
    pairs = Counter(zip(_column(errors, "stage"), _column(errors, "error"), strict=True))
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], str(kv[0])))
    rows = [
        f"<tr><td>{_e(stage)}</td><td>{_e(reason)}</td><td class='num'>{n}</td></tr>"
        for (stage, reason), n in ranked[:MAX_ERROR_REASONS]
    ]
    more = _more_line(len(ranked) - MAX_ERROR_REASONS, "reasons")
    return (
        "<h3>Errors by reason</h3><table><tr><th>stage</th><th>reason</th><th>count</th></tr>"
        + "".join(rows)
        + "</table>"
        + more
    )


def _histogram_section(inputs: _Inputs) -> str:
    """The partition's score distribution, over the normal set's own LOO scores."""
    scores = _finite(_column_numpy(inputs.anomalies, "score"))
    parts = ["<h2>Score distribution</h2>", f'<p class="note">{_e(inputs.index_note)}</p>']
    if scores.size == 0:
        parts.append("<p>No scored images.</p>")
        return _section("histogram", parts)
    normal = _finite(inputs.normal_loo) if inputs.normal_loo is not None else None
    parts.append(_img_plot(_histogram_png(scores, normal), "histogram of anomaly scores"))
    return _section("histogram", parts)


def _histogram_png(scores: np.ndarray, normal: np.ndarray | None) -> bytes:
    """Density histograms (shared bins) of the partition and normal LOO scores."""
    fig = Figure(figsize=(8, 3.6), dpi=100)
    ax = fig.subplots()
    both = scores if normal is None or normal.size == 0 else np.concatenate([scores, normal])
    bins = np.histogram_bin_edges(both, bins=HIST_BINS)
    density = normal is not None and normal.size > 0
    if density:
        ax.hist(normal, bins=bins, density=True, alpha=0.5, color="tab:blue",
                label=f"normal set, leave-one-out (n={normal.size:,})")
        ax.axvline(float(np.percentile(normal, 99)), color="tab:blue", linestyle="--",
                   linewidth=1, label="normal 99th percentile")
    ax.hist(scores, bins=bins, density=density, histtype="step", linewidth=1.5,
            color="tab:red", label=f"this partition (n={scores.size:,})")
    ax.set_xlabel("anomaly score (higher = more anomalous)")
    ax.set_ylabel("density" if density else "images")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return _png(fig)


def _top_section(
    rows: Sequence[Mapping[str, Any]], thumbs: Mapping[str, _Thumb], label_column: str, top: int
) -> str:
    """The top anomalies, each beside its nearest normal neighbours."""
    parts = [
        f"<h2>Top {top} anomalies</h2>",
        '<p class="note">Each row: the scored image (red frame), then its nearest '
        "images from the normal set, nearest first, with their distances.</p>",
    ]
    if not rows:
        parts.append("<p>No scored images.</p>")
        return _section("top", parts)
    body = []
    for row in rows:
        neighbours = row.get("neighbor_uris") or []
        dists = list(row.get("neighbor_distances") or [])
        dists += [None] * (len(neighbours) - len(dists))
        cells = [_thumb_html(row["uri"], thumbs, "anomaly", "anomaly")]
        cells += [
            _thumb_html(n, thumbs, f"d={_fmt_num(d)}", "neighbor")
            for n, d in zip(neighbours, dists, strict=False)
        ]
        label = (
            f"<br>{_e(label_column)}: {_e(row.get(label_column))}" if label_column in row else ""
        )
        body.append(
            "<tr>"
            f"<td class='num'>{_e(row.get('rank'))}</td>"
            f"<td class='num'>{_fmt_num(row.get('score'))}</td>"
            f"<td class='num'>{_fmt_pct(row.get('percentile'))}</td>"
            f"<td><div class='strip'>{''.join(cells)}</div>"
            f"<div class='uri'>{_e(row['uri'])}{label}</div></td>"
            "</tr>"
        )
    parts.append(
        "<table class='top'><tr><th>rank</th><th>score</th><th>percentile</th>"
        "<th>image and nearest normal neighbours</th></tr>" + "".join(body) + "</table>"
    )
    return _section("top", parts)


def _sample_section(
    rows: Sequence[Mapping[str, Any]], thumbs: Mapping[str, _Thumb], n_rows: int, sample: int
) -> str:
    """A seeded random sample of the rest of the partition, in rank order."""
    parts = [
        "<h2>Random sample</h2>",
        f'<p class="note">{len(rows):,} of the other {max(n_rows - len(rows), 0):,} '
        f"scored images (seed {SAMPLE_SEED}, at most {sample}), most anomalous first; "
        "caption: rank, score, percentile.</p>",
    ]
    cells = [
        _thumb_html(
            row["uri"],
            thumbs,
            f"#{_e(row.get('rank'))}<br>{_fmt_num(row.get('score'))} "
            f"({_fmt_pct(row.get('percentile'))})",
            "sample",
        )
        for row in rows
    ]
    grid = f"<div class='grid'>{''.join(cells)}</div>" if cells else "<p>Nothing to show.</p>"
    parts.append(grid)
    return _section("sample", parts)


def _groups_section(
    groups: Sequence[Mapping[str, Any]], n_groups: int, thumbs: Mapping[str, _Thumb]
) -> str:
    """The top groups with a few member thumbnails and their nearest normal groups."""
    parts = [f"<h2>Top groups</h2><p class='note'>{len(groups)} of {n_groups:,} groups.</p>"]
    if not groups:
        return _section("groups", parts)
    body = []
    for g in groups:
        members = list(g.get("member_uris") or [])
        shown = members[:MAX_GROUP_MEMBER_THUMBS]
        cells = "".join(_thumb_html(m, thumbs, "", "member") for m in shown)
        more = f"<div class='note'>+ {len(members) - len(shown):,} more</div>" if (
            len(members) > len(shown)
        ) else ""
        neighbours = list(g.get("neighbor_groups") or [])
        named = ", ".join(_e(n) for n in neighbours[:MAX_NEIGHBOR_GROUPS])
        if len(neighbours) > MAX_NEIGHBOR_GROUPS:
            named += ", …"
        body.append(
            "<tr>"
            f"<td class='num'>{_e(g.get('rank'))}</td><td>{_e(g.get('group'))}</td>"
            f"<td class='num'>{_fmt_num(g.get('score'))}</td>"
            f"<td class='num'>{_e(g.get('size'))}</td>"
            f"<td><div class='strip'>{cells}</div>{more}</td><td>{named}</td>"
            "</tr>"
        )
    parts.append(
        "<table><tr><th>rank</th><th>group</th><th>score</th><th>size</th>"
        "<th>members</th><th>nearest normal groups</th></tr>" + "".join(body) + "</table>"
    )
    return _section("groups", parts)


def _roc_section(anomalies: pa.Table, label_column: str) -> str:
    """ROC curve and ROC-AUC of the scores against the label column."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = [label_is_anomalous(v) for v in anomalies[label_column].to_pylist()]
    scores = _column_numpy(anomalies, "score")
    keep = np.array([lab is not None for lab in labels], dtype=bool) & np.isfinite(scores)
    y = np.array([lab is True for lab in labels], dtype=bool)[keep]
    s = scores[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    parts = [
        "<h2>ROC</h2>",
        f"<p class='note'>Against column {_e(label_column)}: {n_pos:,} anomalous, "
        f"{n_neg:,} normal, {len(labels) - n_pos - n_neg:,} without a usable label "
        "or score (left out).</p>",
    ]
    if n_pos == 0 or n_neg == 0:
        parts.append("<p>ROC needs both anomalous and normal labels; not drawn.</p>")
        return _section("roc", parts)
    auc = float(roc_auc_score(y, s))
    fpr, tpr, _ = roc_curve(y, s)
    parts.append(f"<p>ROC-AUC: <strong id='roc-auc'>{auc:.4f}</strong></p>")
    parts.append(_img_plot(_roc_png(fpr, tpr, auc), "ROC curve"))
    return _section("roc", parts)


def _roc_png(fpr: np.ndarray, tpr: np.ndarray, auc: float) -> bytes:
    """The ROC curve as a PNG."""
    fig = Figure(figsize=(4.2, 4.2), dpi=100)
    ax = fig.subplots()
    ax.plot(fpr, tpr, color="tab:red", linewidth=1.5, label=f"DN2 (AUC {auc:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return _png(fig)


def _errors_section(errors: pa.Table) -> str:
    """The errors table (uri, stage, error), capped at MAX_ERROR_ROWS rows."""
    parts = [f"<h2>Errors</h2><p class='note'>{len(errors):,} images could not be scored.</p>"]
    if len(errors) == 0:
        return _section("errors", parts)
    keys = [(c, "ascending") for c in ("stage", "uri") if c in errors.column_names]
    order = pc.sort_indices(errors, sort_keys=keys).to_numpy()[:MAX_ERROR_ROWS]
    rows = errors.take(order).to_pylist()
    body = "".join(
        f"<tr><td class='uri'>{_e(r.get('uri'))}</td><td>{_e(r.get('stage'))}</td>"
        f"<td>{_e(r.get('error'))}</td></tr>"
        for r in rows
    )
    parts.append("<table><tr><th>uri</th><th>stage</th><th>error</th></tr>" + body + "</table>")
    parts.append(_more_line(len(errors) - len(rows), "errors"))
    return _section("errors", parts)


# --------------------------------------------------------------------------
# HTML and formatting helpers
# --------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; }
.uri { font-family: monospace; font-size: 12px; word-break: break-all; }
.strip, .grid { display: flex; flex-wrap: wrap; gap: 4px; }
figure { margin: 0; width: __PX__px; text-align: center; font-size: 11px;
         overflow-wrap: anywhere; }
figure.anomaly .thumb { outline: 3px solid #d62728; }
.thumb { width: __PX__px; height: __PX__px; object-fit: contain; background: #eee;
         image-rendering: pixelated; display: block; }
.thumb.missing { display: flex; flex-direction: column; justify-content: center;
                 overflow: hidden; color: #a00; font-size: 10px; border: 1px dashed #a00;
                 box-sizing: border-box; word-break: break-word; }
img.plot { max-width: 100%; }
"""


def _page(title: str, sections: Sequence[str], thumb_px: int) -> str:
    """Wrap the sections into a complete HTML document with inline CSS."""
    ids = [s.split('"', 2)[1] for s in sections]
    nav = " ".join(f'<a href="#{i}">{i}</a>' for i in ids)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS.replace('__PX__', str(thumb_px))}</style>"
        f"</head><body><h1>{_e(title)}</h1><nav>{nav}</nav>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _title(summary: Mapping[str, Any] | None, results_dir: str) -> str:
    """Report title: the partition when known, else the results dir."""
    partition = (summary or {}).get("partition")
    return f"DN2 anomaly report: {partition or results_dir}"


def _section(section_id: str, parts: Iterable[str]) -> str:
    """A ``<section id=...>`` holding ``parts``."""
    return f'<section id="{section_id}">' + "".join(parts) + "</section>"


def _kv_table(items: Iterable[tuple[Any, Any]]) -> str:
    """A two-column table of escaped keys and values (None shown as a dash)."""
    rows = "".join(
        f"<tr><th>{_e(k)}</th><td>{'–' if v is None else _e(v)}</td></tr>" for k, v in items
    )
    return f"<table>{rows}</table>"


def _img_plot(png: bytes, alt: str) -> str:
    """An embedded PNG plot."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _png(fig: Figure) -> bytes:
    """Render a matplotlib figure to PNG bytes (no pyplot: no global state)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _more_line(n_more: int, what: str) -> str:
    """A "N more ... not shown" line, or nothing."""
    return f"<p class='note'>{n_more:,} more {what} not shown.</p>" if n_more > 0 else ""


def _e(value: Any) -> str:
    """Escape any value for HTML text or attribute use."""
    return html.escape("" if value is None else str(value))


def _fmt_num(value: Any) -> str:
    """A score or distance with 4 significant digits; a dash when absent."""
    if value is None:
        return "–"
    return f"{float(value):.4g}"


def _fmt_pct(value: Any) -> str:
    """A percentile (0..100) with one decimal."""
    if value is None or not math.isfinite(float(value)):
        return "–"
    return f"{float(value):.1f}%"


def _fmt_seconds(value: Any) -> str:
    """A duration in seconds, rounded for reading."""
    if isinstance(value, int | float):
        return f"{value:,.1f} s"
    return str(value)


def _column(table: pa.Table, name: str) -> list[Any]:
    """A column as a Python list; all None when the column is missing."""
    if name in table.column_names:
        return table[name].to_pylist()
    return [None] * len(table)


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with nulls as NaN."""
    if name not in table.column_names or len(table) == 0:
        return np.array([], dtype=np.float64)
    col = pc.cast(table[name], pa.float64())
    return pc.fill_null(col, float("nan")).to_numpy().astype(np.float64)


def _finite(values: np.ndarray) -> np.ndarray:
    """Drop NaN and infinite values."""
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _single_value(table: pa.Table, name: str) -> Any:
    """The value of a column if all rows agree (e.g. partition), else None."""
    if name not in table.column_names or len(table) == 0:
        return None
    distinct = pc.unique(table[name]).to_pylist()
    return distinct[0] if len(distinct) == 1 else None
