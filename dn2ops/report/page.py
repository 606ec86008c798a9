"""The report page: its inputs, thumbnails and plots rendered through one Jinja template.

Autoescaping is on for the whole template and nothing from the data is marked
safe, so a manifest value or file name such as ``<script>`` shows as text.
"""

from __future__ import annotations

import functools
import math
import posixpath
import uuid
from typing import Any

import fsspec
import jinja2
from fsspec.implementations.local import LocalFileSystem

from dn2ops.report import content, plots
from dn2ops.report.inputs import ReportInputs, read_inputs
from dn2ops.report.overlays import make_overlays
from dn2ops.report.thumbs import make_thumbs

TEMPLATE = "report.html"


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
        results_dir: local path or fsspec URL of a committed ``dn2 score``
            output (``anomalies-*.parquet``, ``errors-*.parquet``, optional
            ``groups-*.parquet``, ``summary.json``, ``_SUCCESS``).
        index_dir: the normal index whose ``normal.parquet`` leave-one-out
            scores are drawn under the partition's in the histogram. When
            None, ``summary.json``'s ``index_dir`` is used if it is reachable and committed.
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
        dn2ops.io.outputs.OutputError: ``results_dir`` does not exist or is not a
            committed results directory; or ``index_dir`` is not a committed index.
        dn2ops.report.inputs.NoNormalScores: ``index_dir`` has no ``normal.parquet``
            (a FileNotFoundError).
        ValueError: a negative ``top``/``sample`` or non-positive ``thumb_px``.
    """
    if top < 0 or sample < 0:
        raise ValueError(f"top and sample must be >= 0, got top={top}, sample={sample}")
    if thumb_px < 1:
        raise ValueError(f"thumb_px must be >= 1, got {thumb_px}")
    inputs = read_inputs(results_dir, index_dir, label_column)
    return _template().render(_context(inputs, results_dir, top, sample, label_column, thumb_px))


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


@functools.cache
def _template() -> jinja2.Template:
    """The page template, loaded from the package (it ships as package data)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dn2ops.report", "templates"),
        # On for every template, whatever its name: safety is the default.
        autoescape=jinja2.select_autoescape(default_for_string=True, default=True),
        undefined=jinja2.StrictUndefined,  # a misspelt name fails, not renders blank
        finalize=lambda value: "" if value is None else value,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=fmt_num, pct=fmt_pct, count=lambda n: f"{n:,}", text=_text)
    return env.get_template(TEMPLATE)


def _context(inputs: ReportInputs, results_dir: str, top: int, sample: int, label_column: str,
             thumb_px: int) -> dict[str, Any]:
    """Every value the template shows, with the thumbnails it embeds."""
    top_rows, sample_rows = content.select_rows(inputs.anomalies, top, sample)
    groups = content.top_groups(inputs.groups, top)
    removed = content.removed_view(inputs.removed)
    uris = content.uris_to_show(top_rows, sample_rows, groups)
    uris += [row["uri"] for row in (removed or {}).get("rows", []) if row["uri"] not in uris]
    return {
        "title": _title(inputs.summary, results_dir),
        "thumb_px": thumb_px,
        "thumbs": make_thumbs(uris, thumb_px),
        "overlays": make_overlays(results_dir, top_rows, thumb_px),
        "removed": removed,
        "label_column": label_column,
        **_summary_context(inputs, results_dir),
        **_plots_context(inputs, label_column),
        **_rows_context(inputs, top_rows, sample_rows, top, sample),
        **_groups_context(inputs, groups),
        "n_errors": len(inputs.errors),
        "error_rows": content.error_rows(inputs.errors),
    }


def _summary_context(inputs: ReportInputs, results_dir: str) -> dict[str, Any]:
    """Counts, provenance, timings and errors by stage and reason."""
    timings = (inputs.summary or {}).get("timings") or {}
    reasons, reasons_more = content.error_reasons(inputs.errors)
    return {
        "facts": content.summary_facts(inputs, results_dir),
        "notes": content.summary_notes(inputs),
        "timings": [(k, fmt_seconds(v)) for k, v in timings.items()],
        "errors_by_stage": content.errors_by_stage(inputs),
        "reasons": reasons,
        "reasons_more": reasons_more,
    }


def _plots_context(inputs: ReportInputs, label_column: str) -> dict[str, Any]:
    """The histogram over the normal set's scores, and the ROC when labels exist."""
    scores = content.finite_scores(content.column_numpy(inputs.anomalies, "score"))
    normal = content.finite_scores(inputs.normal_loo)
    roc = None
    if label_column in inputs.anomalies.column_names:
        roc = content.roc(inputs.anomalies, label_column)
    return {
        "index_note": inputs.index_note,
        "histogram": plots.histogram_png(scores, normal) if scores.size else None,
        "roc": roc,
        "roc_plot": (
            plots.roc_png(roc.fpr, roc.tpr, roc.auc) if roc and roc.auc is not None else None
        ),
    }


def _rows_context(inputs: ReportInputs, top_rows: list[dict[str, Any]],
                  sample_rows: list[dict[str, Any]], top: int, sample: int) -> dict[str, Any]:
    """The top rows (flagged first) with their neighbours, what the flag means, and the
    random sample."""
    return {
        "top": top,
        "flag_sentence": content.flag_sentence(inputs.summary),
        "top_rows": [(row, content.neighbours(row)) for row in top_rows],
        "sample": sample,
        "seed": content.SAMPLE_SEED,
        "sample_rows": sample_rows,
        "n_other": len(inputs.anomalies) - len(top_rows),  # the rows the sample is drawn from
    }


def _groups_context(inputs: ReportInputs, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The top groups (None when the results hold no group tables)."""
    if inputs.groups is None:
        return {"groups": None, "n_groups": 0}
    return {"groups": [content.group_view(g) for g in groups], "n_groups": len(inputs.groups)}


def _title(summary: dict[str, Any] | None, results_dir: str) -> str:
    """Report title: the partition when known, else the results dir."""
    partition = (summary or {}).get("partition")
    return f"DN2 anomaly report: {partition or results_dir}"


def fmt_num(value: Any) -> str:
    """A score or distance with 4 significant digits; a dash when absent."""
    if value is None:
        return "–"
    return f"{float(value):.4g}"


def fmt_pct(value: Any) -> str:
    """A percentile (0..100) with one decimal."""
    if value is None or not math.isfinite(float(value)):
        return "–"
    return f"{float(value):.1f}%"


def fmt_seconds(value: Any) -> str:
    """A duration in seconds, rounded for reading."""
    if isinstance(value, int | float):
        return f"{value:,.1f} s"
    return str(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)
