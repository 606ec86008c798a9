"""The last step of a dn2 job: count, check and commit a staged output directory.

These functions run as the final step of the Beam pipeline itself (see
``graphs.finalize``), once every Parquet write has finished, so a job commits its
outputs wherever it runs: in this process, on Dataflow workers after
``dn2 score --runner DataflowRunner``, or in a job launched from the flex template,
where no code runs after the job. They are plain functions of their arguments and
the staged files, so they are tested without Beam.

A step Dataflow retries after its commit went through finds the output's ``_SUCCESS``
naming this run (``run_id``): it finishes the commit's clean-up and returns the
committed summary instead of failing (see dn2ops.io.outputs for the commit protocol).

Each step runs under the output's lease (dn2ops.io.lease), whose run id is the staging
folder's name: it adopts the lease the job's process holds, wherever the step runs, or
takes it where no process holds one (a template job, which nobody waits on), and
releases only a lease it took. The commit is fenced by it: a step whose run lost the
lease (another run took it over) raises LeaseLost before ``_SUCCESS`` is written.
"""

from __future__ import annotations

import csv
import datetime
import functools
import io
import json
import logging
import posixpath
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.base import resolve_engine
from dn2ops.errors import UserError
from dn2ops.io import features, lease, outputs, result_tables

LOG = logging.getLogger("dn2")


class JobError(UserError, RuntimeError):
    """A run finished but its outcome is not acceptable (e.g. too many errors)."""


def _utcnow() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def run_id(staging: str) -> str:
    """The name of a run's staging folder, recorded in the marker it commits."""
    return posixpath.basename(staging.rstrip("/"))


def rows(directory: str, prefix: str) -> int:
    """Rows in the ``prefix`` shards of a directory, from the Parquet footers."""
    fs, _ = outputs.fs_and_path(directory)
    total = 0
    for p in features.shard_paths(directory, prefix):
        with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def check_accounted(count_in: int | None, done: int, errored: int, where: str) -> None:
    if count_in is not None and count_in != done + errored:
        raise JobError(
            f"{count_in} inputs but {done} results + {errored} errors in {where}: "
            "images were lost; this is a dn2 bug, please report it"
        )


def check_error_fraction(summary: dict, limit: float | None, output: str) -> None:
    """Raises JobError when more than ``limit`` of the inputs errored."""
    if limit is None or not summary["count_in"]:
        return
    fraction = summary["errored"] / summary["count_in"]
    if fraction > limit:
        raise JobError(
            f"{summary['errored']} of {summary['count_in']} inputs errored "
            f"({fraction:.1%} > --max-error-fraction {limit:.1%}); "
            f"see {outputs.join(output, 'errors-*.parquet')}"
        )


def _committed(staging: str, output: str) -> dict[str, Any] | None:
    """The marker this run already committed (a retried step), or None if it must commit.

    A step retried after its ``_SUCCESS`` landed finds that marker naming this run: it
    finishes the clean-up the first attempt may not have reached and returns the marker.
    A step retried before that finds its staging intact and commits again from the start.
    """
    marker = outputs.read_marker(output)
    if marker is not None and marker.get("run_id") == run_id(staging):
        outputs.finish_commit(staging, output)
        LOG.info("%s was already committed by this run (a retried step)", output)
        return {k: v for k, v in marker.items() if k not in ("kind", "run_id", outputs.FILES)}
    fs, stage_path = outputs.fresh_fs_and_path(staging)
    if not fs.exists(stage_path):
        raise JobError(f"staging folder {staging} is gone and {output} was not committed "
                       "by this run; run it again")
    return None


def _under_lease(step):
    """``step(count_in, staging=..., output=..., ...)`` run holding OUTPUT's lease for
    the run of ``staging`` (adopted from the job's process, or taken here)."""

    @functools.wraps(step)
    def leased(count_in: int, *, staging: str, output: str, **kwargs) -> dict[str, Any]:
        with lease.hold(output, run_id(staging)):
            return step(count_in, staging=staging, output=output, **kwargs)

    return leased


def finalize_embedded(count_in: int, *, plan: EmbedPlan, reuse: str | None = None,
                      reused: int = 0, **kwargs) -> dict[str, Any]:
    """finalize_features with ``plan``'s metadata, recording the engine that
    ``plan.config.engine`` resolves to where the pipeline's last step runs (beside the
    model: a Dataflow worker, GPU or not), and with ``reuse``, the images whose features
    were copied from it. (Here, not in pipelines.jobs: the workers unpickle it, and this
    module imports neither the index nor the scoring, so an embedding worker loads
    neither faiss nor torch; docs/memory.md.)"""
    config = plan.config
    metadata = {**plan.metadata(), "engine": resolve_engine(config.engine, config.device),
                "decode": config.decode}
    if reuse:
        metadata["reused"] = {"from": reuse, "images": reused}
    return finalize_features(count_in, metadata=metadata, **kwargs)


@_under_lease
def finalize_features(count_in: int, *, staging: str, output: str, metadata: dict[str, Any],
                      input: str, extra_columns: list[str], started: float) -> dict[str, Any]:
    """dn2 embed's last step: the features marker, checked and committed. Returns the marker.

    ``count_in``: images listed; ``metadata``: the backbone's (name, dim, preprocessing);
    ``started``: epoch seconds when the job began. Raises JobError, and discards the
    staging folder, when listed != embedded + errored.
    """
    done = _committed(staging, output)
    if done is not None:
        return {"kind": features.KIND, **done}
    try:
        marker = {
            "kind": features.KIND,
            **metadata,
            "input": input,
            "count_in": count_in,
            "embedded": rows(staging, "features"),
            "errored": rows(staging, "errors"),
            "extra_columns": list(extra_columns),
            "created_at": _utcnow(),
            "seconds": round(time.time() - started, 2),
        }
        check_accounted(marker["count_in"], marker["embedded"], marker["errored"], staging)
    except JobError:
        outputs.discard(staging)  # deterministic: a retry would find the same
        raise
    outputs.commit(staging, output, {**marker, "run_id": run_id(staging)})
    return marker


@_under_lease
def finalize_results(count_in: int, *, staging: str, output: str, partition: str,
                     source: str | None, index_dir: str | None, index_id: str | None,
                     backbone: str | None, started: float, pipeline_started: float,
                     top: int | None = None, group: dict[str, Any] | None = None,
                     max_error_fraction: float | None = None,
                     decision: dict[str, Any] | None = None,
                     heatmaps: dict[str, Any] | None = None) -> dict[str, Any]:
    """dn2 score's last step: summary.json, the accounting check, the top CSV, the commit.

    ``count_in``: inputs listed (images, or feature rows + error rows of a features
    directory); ``group``: ``{"group_by", "method", "pool"}`` in group mode, else None;
    ``decision``: the scoring stage's (dn2ops.score.decisions.decide: ``flags``,
    ``drift``, ``warnings``), added to the summary, its warnings logged; ``heatmaps``:
    the explain stage's result (dn2ops.score.heatmaps), its ``summary`` added as
    ``heatmaps`` (the PNGs' scale, the settings, missing neighbours, failures);
    ``started`` / ``pipeline_started``: epoch seconds when the job / its pipeline began
    (summary ``timings``). Raises JobError, and discards the staging folder, when
    count_in != scored + errored: nothing is committed. With ``max_error_fraction``
    the error fraction is checked after the commit (the results are there to read)
    and a JobError fails the step; ``jobs.score`` passes it only to jobs nobody waits
    for (template launches), and checks it itself otherwise.
    Returns the summary (the contents of summary.json).
    """
    summary = _committed(staging, output)
    if summary is None:
        try:
            summary = results_summary(
                staging, count_in=count_in, partition=partition, source=source,
                index_dir=index_dir, index_id=index_id, backbone=backbone,
                timings={"pipeline_s": round(time.time() - pipeline_started, 2),
                         "total_s": round(time.time() - started, 2)})
            if group:
                summary.update(group_summary(staging, group["group_by"], group["method"],
                                             group.get("pool")))
            if decision is not None:
                summary.update(decision_summary(decision))
            if heatmaps is not None:  # dn2ops.score.heatmaps.explained_result
                summary["heatmaps"] = heatmaps["summary"]
            check_accounted(summary["count_in"], summary["scored"], summary["errored"],
                            staging)
        except JobError:
            outputs.discard(staging)  # deterministic: a retry would find the same
            raise
        _commit_results(staging, output, summary, top, bool(group))
    check_error_fraction(summary, max_error_fraction, output)
    return summary


def _commit_results(staging: str, output: str, summary: dict[str, Any], top: int | None,
                    group: bool) -> None:
    """Writes the top CSV and summary.json into the staging folder, commits it, and logs
    the summary's warnings."""
    fs, stage_path = outputs.fs_and_path(staging)
    if top and group:
        fs.pipe_file(outputs.join(stage_path, "top_groups.csv"), top_groups_csv(staging, top))
    elif top:
        fs.pipe_file(outputs.join(stage_path, "top_anomalies.csv"), top_csv(staging, top))
    fs.pipe_file(outputs.join(stage_path, "summary.json"),
                 json.dumps(summary, indent=2).encode())
    outputs.commit(staging, output, {"kind": "results", **summary, "run_id": run_id(staging)})
    for warning in summary.get("warnings", []):
        LOG.warning("%s: %s", output, warning)


def committed_summary(output: str) -> dict[str, Any]:
    """summary.json of a committed results directory (what its pipeline's last step wrote)."""
    outputs.require_complete(output, "results")
    fs, path = outputs.fs_and_path(output)
    return json.loads(fs.cat_file(outputs.join(path, "summary.json")))


def results_summary(staging: str, *, count_in: int | None, partition: str, source: str | None,
                    index_dir: str | None, index_id: str | None, backbone: str | None,
                    timings: dict[str, float]) -> dict[str, Any]:
    """summary.json of a results directory (image mode; group mode adds group_summary)."""
    errors = features.read_table(staging, "errors", columns=["stage"])
    by_stage: dict[str, int] = {}
    if errors is not None:  # counted by Arrow: one entry a stage, not one an error
        for entry in pc.value_counts(errors.column("stage")).to_pylist():
            by_stage[entry["values"]] = entry["counts"]
    return {
        "count_in": count_in,
        "scored": rows(staging, "anomalies"),
        "errored": rows(staging, "errors"),
        "errors_by_stage": by_stage,
        "partition": partition,
        "backbone": backbone,
        "index_id": index_id,
        "index_dir": index_dir,
        "input": source,
        "timings": timings,
        "created_at": _utcnow(),
        # the version of dn2's result tables' schema file (dn2ops.io.result_tables)
        "schema_version": result_tables.schema_version(),
    }


def decision_summary(decision: dict[str, Any]) -> dict[str, Any]:
    """summary.json's ``flags`` (rule, level, flagged, threshold, p_value_floor,
    reference_n; or rule None and why), ``drift`` and ``warnings`` of a decision."""
    return {"flags": decision["flags"], "drift": decision.get("drift"),
            "warnings": list(decision.get("warnings") or [])}


def _p_value(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _flag(value: bool | None) -> str:
    return "" if value is None else str(bool(value)).lower()


def _top_rows(results_dir: str, n: int, columns: list[str]) -> list[dict[str, Any]]:
    """The n anomaly rows first by (rank, uri), read a shard at a time: only about
    n rows are held beside the shard being read (plus its rank and uri columns)."""
    fs, _ = outputs.fs_and_path(results_dir)
    keys = [("rank", "ascending"), ("uri", "ascending")]
    best = None
    for p in features.shard_paths(results_dir, "anomalies"):
        with fs.open(outputs.fs_and_path(p)[1], "rb") as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=65_536, columns=columns):
                part = pa.Table.from_batches([batch], schema=batch.schema)
                part = part.take(pc.sort_indices(part, sort_keys=keys)[:n])
                best = part if best is None else pa.concat_tables([best, part])
                best = best.take(pc.sort_indices(best, sort_keys=keys)[:n])
    return best.to_pylist() if best is not None else []


def top_csv(results_dir: str, n: int) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    columns = ["rank", "score", "percentile", "p_value", "flagged", "uri", "neighbor_uris",
               "heatmap_uri"]
    w.writerow(columns)
    for r in _top_rows(results_dir, n, columns):
        w.writerow(
            [
                r["rank"],
                f"{r['score']:.6f}",
                f"{r['percentile']:.2f}",
                _p_value(r["p_value"]),
                _flag(r["flagged"]),
                r["uri"],
                " ".join(r["neighbor_uris"]),
                r["heatmap_uri"] or "",
            ]
        )
    return buf.getvalue().encode()


def group_summary(staging: str, group_by: str, method: str, pool: str | None
                  ) -> dict[str, Any]:
    """Group mode: ``scored`` = images in scored sets; the sets' own counts under ``groups``.

    Members of sets too small to score are image errors (stage 'group'), so
    count_in == scored + errored still holds.
    """
    table = features.read_table(staging, "groups", columns=["size"])
    sizes = table.column("size").to_pylist() if table is not None else []
    errors = features.read_table(staging, "errors", columns=["stage", "error"])
    small = set()
    for stage, error in (zip(*[errors.column(c).to_pylist() for c in ("stage", "error")],
                             strict=True) if errors is not None else []):
        if stage == "group":
            small.add(error)  # one message per set: it names the set
    return {"scored": int(sum(sizes)),
            "groups": {"group_by": group_by, "method": method, "pool": pool,
                       "scored": len(sizes), "errored": len(small)}}


def top_groups_csv(results_dir: str, n: int) -> bytes:
    columns = ["rank", "score", "p_value", "flagged", "group", "size", "neighbor_groups"]
    table = features.read_table(results_dir, "groups", columns=columns)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    rows_ = table.to_pylist() if table is not None else []
    for r in sorted(rows_, key=lambda r: (r["rank"], r["group"]))[:n]:
        w.writerow([r["rank"], f"{r['score']:.6f}", _p_value(r["p_value"]), _flag(r["flagged"]),
                    r["group"], r["size"], " ".join(r["neighbor_groups"])])
    return buf.getvalue().encode()
