"""pipelines.finalize: the pipelines' committing last step, as plain functions and in a run.

The plain-function tests stage hand-written Parquet files; the pipeline tests run the
graph on the FnApiRunner with nothing after ``run()`` (as a Dataflow template job runs)
and check the committed directory against brute-force numpy.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import time
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.datasets import write_png_store
from dn2ops.config import SearchConfig
from dn2ops.io import outputs
from dn2ops.io.features import ERROR_SCHEMA, feature_schema, load_features, read_table
from dn2ops.score.images import anomaly_schema
from dn2ops.score.sets import group_schema
from pipelines import finalize, graphs, options
from pipelines.cli import main
from tests.conftest import brute_scores, digit_images, root4_l2

SUMMARY_KEYS = ["count_in", "scored", "errored", "errors_by_stage", "partition", "backbone",
                "index_id", "index_dir", "input", "timings", "created_at", "schema_version",
                "flags", "drift", "warnings"]
DRIFT = {"test": "ks-uniform", "lower": 0.2, "level": 0.001, "rows": 3, "statistic": None,
         "pvalue": None, "warn": False}
# What the scoring stage decided for _stage_results' partition (dn2ops.score.decisions).
DECISION = {"flags": {"rule": "fdr", "level": 0.05, "flagged": 1, "threshold": 0.9,
                      "p_value_floor": 0.0, "reference_n": 500},
            "drift": DRIFT, "warnings": ["reference too small, say"]}


def _write(directory: Path, prefix: str, rows: list[dict], schema: pa.Schema) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                   directory / f"{prefix}-00000-of-00001.parquet")


def _anomaly(uri: str, score: float, rank: int, pct: float, p: float = 0.5,
             flagged: bool = False) -> dict:
    return {"uri": uri, "score": score, "rank": rank, "percentile": pct, "p_value": p,
            "p_value_source": "rank", "flagged": flagged,
            "neighbor_uris": [f"{uri}-n1", f"{uri}-n2"], "neighbor_distances": [0.1, 0.2],
            "partition": "2026-11-28", "backbone": "efficientnet_lite0", "index_id": "ix",
            "sha256": "0" * 64}


def _error(uri: str, stage: str, error: str = "boom") -> dict:
    return {"uri": uri, "stage": stage, "error": error, "partition": "2026-11-28"}


def _stage_results(output: Path) -> str:
    """A staged image-mode result: 3 anomalies, 3 errors (2 read, 1 decode)."""
    staging = Path(outputs.new_staging(str(output)))
    _write(staging, "anomalies", [_anomaly("a", 0.5, 2, 80.0, 0.2),
                                  {**_anomaly("b", 0.9, 1, 99.5, 1.2345678e-5, True),
                                   "heatmap_uri": "heatmaps/b.png", "hot_box": [1, 2, 3, 4]},
                                  _anomaly("c", 0.1, 3, 10.25, 0.9)], anomaly_schema())
    _write(staging, "errors", [_error("x", "read"), _error("y", "decode"), _error("z", "read")],
           graphs.RESULT_ERROR_SCHEMA)
    return str(staging)


def _results(staging: str, output: Path, count_in: int, **kw) -> dict:
    now = time.time()
    args = dict(staging=staging, output=str(output), partition="2026-11-28",
                source="gs://b/images/dt=2026-11-28/", index_dir="gs://b/index", index_id="ix",
                backbone="efficientnet_lite0", started=now - 10, pipeline_started=now - 4)
    return finalize.finalize_results(count_in, **{**args, **kw})


# --- finalize_results as a plain function -------------------------------------------


def test_finalize_results_writes_summary_top_csv_and_commits(tmp_path, caplog):
    out = tmp_path / "results"
    staging = _stage_results(out)
    summary = _results(staging, out, 6, top=2, decision=DECISION)
    assert list(summary) == SUMMARY_KEYS
    assert (summary["flags"], summary["drift"]) == (DECISION["flags"], DRIFT)
    assert summary["warnings"] == ["reference too small, say"]
    assert f"{out}: reference too small, say" in [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (summary["count_in"], summary["scored"], summary["errored"]) == (6, 3, 3)
    assert summary["errors_by_stage"] == {"read": 2, "decode": 1}
    assert (summary["partition"], summary["index_id"], summary["input"]) == (
        "2026-11-28", "ix", "gs://b/images/dt=2026-11-28/")
    assert 10 <= summary["timings"]["total_s"] < 60 and 4 <= summary["timings"]["pipeline_s"]
    assert json.loads((out / "summary.json").read_text()) == summary
    marker = json.loads((out / outputs.MARKER).read_text())
    files = marker.pop(outputs.FILES)
    assert marker == {"kind": "results", **summary, "run_id": Path(staging).name}
    # _SUCCESS lists every committed file with its size, and nothing else
    assert files == [{"name": p.name, "size": p.stat().st_size} for p in sorted(out.iterdir())
                     if p.name != outputs.MARKER]
    rows = list(csv.reader(io.StringIO((out / "top_anomalies.csv").read_text())))
    assert rows == [["rank", "score", "percentile", "p_value", "flagged", "uri",
                     "neighbor_uris", "heatmap_uri"],
                    ["1", "0.900000", "99.50", "1.23457e-05", "true", "b", "b-n1 b-n2",
                     "heatmaps/b.png"],
                    ["2", "0.500000", "80.00", "0.2", "false", "a", "a-n1 a-n2", ""]]
    assert not Path(staging).exists() and not (out / outputs.COMMITTING).exists()
    assert sorted(read_table(str(out), "anomalies").column("uri").to_pylist()) == ["a", "b", "c"]


def test_lost_rows_fail_and_commit_nothing(tmp_path):
    out = tmp_path / "results"
    _results(_stage_results(out), out, 6)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    staging = _stage_results(out)
    with pytest.raises(finalize.JobError, match="7 inputs but 3 results . 3 errors"):
        _results(staging, out, 7)
    assert not Path(staging).exists()  # discarded: a retry would find the same
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old run stays


def test_a_retried_step_returns_what_it_committed(tmp_path):
    out = tmp_path / "results"
    staging = _stage_results(out)
    first = _results(staging, out, 6, top=2)
    marker = (out / outputs.MARKER).read_bytes()
    assert _results(staging, out, 6, top=2) == first  # staging gone, _SUCCESS names it
    assert (out / outputs.MARKER).read_bytes() == marker
    with pytest.raises(finalize.JobError, match="was not committed by this run"):
        _results(str(out / "_staging-000000000000"), out, 6)


def test_a_step_retried_after_its_success_landed_finishes_the_clean_up(tmp_path, monkeypatch):
    out = tmp_path / "results"
    staging = _stage_results(out)

    def killed(*args):  # the step dies after _SUCCESS, before the clean-up
        raise KeyboardInterrupt("simulated kill")

    real = outputs.finish_commit
    monkeypatch.setattr(outputs, "finish_commit", killed)
    with pytest.raises(KeyboardInterrupt):
        _results(staging, out, 6, top=2)
    monkeypatch.setattr(outputs, "finish_commit", real)
    assert (out / outputs.MARKER).exists() and (out / outputs.COMMITTING).exists()
    assert Path(staging).exists()
    summary = _results(staging, out, 6, top=2)  # the retry: nothing is committed twice
    assert summary == json.loads((out / "summary.json").read_text())
    assert not Path(staging).exists() and not (out / outputs.COMMITTING).exists()
    assert sorted(read_table(str(out), "anomalies").column("uri").to_pylist()) == ["a", "b", "c"]


def test_max_error_fraction_fails_after_committing(tmp_path):
    out = tmp_path / "results"
    with pytest.raises(finalize.JobError, match=r"3 of 6 inputs errored \(50.0% > "
                                                r"--max-error-fraction 40.0%\)"):
        _results(_stage_results(out), out, 6, max_error_fraction=0.4)
    assert outputs.require_complete(str(out), "results")["errored"] == 3  # there to read
    assert _results(_stage_results(out), out, 6, max_error_fraction=0.5)["errored"] == 3


def test_group_mode_summary_and_top_groups(tmp_path):
    out = tmp_path / "results"
    staging = Path(outputs.new_staging(str(out)))

    def group(name, size, score, rank):
        return {"group": name, "score": score, "rank": rank, "size": size,
                "member_uris": [f"{name}/{i}" for i in range(size)],
                "neighbor_groups": ["n0", "n1"], "neighbor_distances": [1.0, 2.0],
                "percentile": 50.0, "p_value": 0.01 * rank, "p_value_source": "rank",
                "flagged": rank == 1, "method": "knn", "pool": "mean", "group_by": "parent_dir",
                "partition": "p", "backbone": "efficientnet_lite0", "index_id": "ix"}

    _write(staging, "groups", [group("lot-a", 5, 0.25, 2), group("lot-b", 4, 1.5, 1)],
           group_schema())
    _write(staging, "errors", [_error("lot-solo/0", "group", "set lot-solo has 1 image"),
                               _error("lot-c/0", "read")], graphs.RESULT_ERROR_SCHEMA)
    summary = _results(str(staging), out, 11, top=5,
                       group={"group_by": "parent_dir", "method": "knn", "pool": "mean"})
    assert (summary["count_in"], summary["scored"], summary["errored"]) == (11, 9, 2)
    assert summary["groups"] == {"group_by": "parent_dir", "method": "knn", "pool": "mean",
                                 "scored": 2, "errored": 1}
    rows = list(csv.reader(io.StringIO((out / "top_groups.csv").read_text())))
    assert rows == [["rank", "score", "p_value", "flagged", "group", "size",
                     "neighbor_groups"],
                    ["1", "1.500000", "0.01", "true", "lot-b", "4", "n0 n1"],
                    ["2", "0.250000", "0.02", "false", "lot-a", "5", "n0 n1"]]
    assert not (out / "top_anomalies.csv").exists()


def test_finalize_features_marker(tmp_path):
    out = tmp_path / "features"
    staging = Path(outputs.new_staging(str(out)))
    row = {"uri": "a", "sha256": "0" * 64, "backbone": "b", "dim": 2, "embedding": [1.0, 2.0]}
    _write(staging, "features", [row, {**row, "uri": "b"}], feature_schema())
    _write(staging, "errors", [{"uri": "c", "stage": "read", "error": "boom"}], ERROR_SCHEMA)
    meta = {"backbone": "b", "dim": 2, "preprocessing": {"resize": 8}}
    marker = finalize.finalize_features(3, staging=str(staging), output=str(out), metadata=meta,
                                        input="/images", extra_columns=[],
                                        started=time.time() - 3)
    assert {k: marker[k] for k in ("count_in", "embedded", "errored", "backbone", "dim")} == {
        "count_in": 3, "embedded": 2, "errored": 1, "backbone": "b", "dim": 2}
    assert 3 <= marker["seconds"] < 60
    on_disk = outputs.require_complete(str(out), "features")
    assert on_disk == {**marker, "run_id": staging.name, outputs.FILES: [
        {"name": p.name, "size": p.stat().st_size} for p in sorted(out.glob("*.parquet"))]}
    staging2 = Path(outputs.new_staging(str(out)))
    _write(staging2, "features", [row], feature_schema())
    with pytest.raises(finalize.JobError, match="3 inputs but 1 results . 0 errors"):
        finalize.finalize_features(3, staging=str(staging2), output=str(out), metadata=meta,
                                   input="/images", extra_columns=[], started=time.time())
    assert outputs.require_complete(str(out), "features") == on_disk


# --- the pipeline commits by itself, with nothing after run() ------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """normal/ and incoming/ digits (incoming with one undecodable file), embedded, and an
    index of normal: (root, normal features, incoming features, index)."""
    root = tmp_path_factory.mktemp("finalize")
    normal, incoming, _ = digit_images(n_normal=16, n_incoming=12)
    write_png_store(normal, [f"n{i:02d}" for i in range(len(normal))], str(root / "normal"))
    write_png_store(incoming, [f"i{i:02d}" for i in range(len(incoming))],
                    str(root / "incoming"))
    (root / "incoming" / "broken.png").write_bytes(b"\x89PNG not really")
    for part in ("normal", "incoming"):
        assert main(["embed", "--input", str(root / part), "--output",
                     str(root / f"{part}_features"), "--device", "cpu"]) == 0
    assert main(["build-index", "--features", str(root / "normal_features"), "--output",
                 str(root / "index")]) == 0
    return root, root / "normal_features", root / "incoming_features", root / "index"


def _brute_force_scores(xq: np.ndarray, xb: np.ndarray, k: int = 2) -> np.ndarray:
    """Scores of the default index: mean distance between root4-l2 features."""
    return brute_scores(root4_l2(xq), root4_l2(xb), k)


def test_the_pipeline_commits_with_no_code_after_run(store, tmp_path):
    """As a Dataflow template job: the graph, then run(); nothing of jobs.py afterwards."""
    _, normal, incoming, index = store
    out = tmp_path / "results"
    staging = outputs.new_staging(str(out))
    p = beam.Pipeline(options=options.beam_options([]))
    feats, errors, count_in = graphs.read_features(p, str(incoming))
    written, decision = graphs.score(feats, errors, staging, index_dir=str(index),
                                     partition="2026-11-28", extra_columns=[],
                                     search=SearchConfig())
    graphs.finalize(p, functools.partial(
        finalize.finalize_results, staging=staging, output=str(out), partition="2026-11-28",
        source=str(incoming), index_dir=str(index),
        index_id=outputs.read_marker(str(index))["index_id"], backbone="efficientnet_lite0",
        started=time.time(), pipeline_started=time.time(), top=5),
        count_in=count_in, written=written, counts={"decision": decision})
    p.run().wait_until_finish()

    marker = outputs.require_complete(str(out), "results")
    summary = json.loads((out / "summary.json").read_text())
    files = marker.pop(outputs.FILES)
    assert marker == {"kind": "results", **summary, "run_id": Path(staging).name}
    # _SUCCESS lists every committed file with its size, and nothing else
    assert files == [{"name": p.name, "size": p.stat().st_size} for p in sorted(out.iterdir())
                     if p.name != outputs.MARKER]
    table, xq, _ = load_features(str(incoming))
    _, xb, _ = load_features(str(normal))
    assert summary["count_in"] == table.num_rows + 1 == 13  # 12 images + broken.png
    assert (summary["scored"], summary["errored"]) == (12, 1)
    assert list(summary["errors_by_stage"].values()) == [1]
    expected = sorted(zip(_brute_force_scores(xq, xb), table.column("uri").to_pylist(),
                          strict=True), reverse=True)[:5]
    top = list(csv.DictReader(io.StringIO((out / "top_anomalies.csv").read_text())))
    assert [r["uri"] for r in top] == [u for _, u in expected]
    np.testing.assert_allclose([float(r["score"]) for r in top], [s for s, _ in expected],
                               rtol=1e-4)
    assert not list(out.glob("_staging-*")) and not list(out.glob("beam-temp-*"))
    # the decision the ranking pass flagged by is the one summary.json reports
    ranked = read_table(str(out), "anomalies")
    flags = summary["flags"]
    assert (flags["rule"], flags["level"]) == ("fdr", 0.05)
    assert flags["flagged"] == sum(ranked.column("flagged").to_pylist())
    assert flags["reference_n"] == 16 and summary["drift"]["test"] == "ks-uniform"
    assert [r["p_value"] for r in top] == [f"{p:.6g}" for p in sorted(
        ranked.column("p_value").to_pylist())[:5]]


def test_template_launch_commits_in_the_job_and_fails_it_on_too_many_errors(store, tmp_path,
                                                                           capsys):
    """jobs.score with --template_location on the in-process runner: run() executes the
    whole job, so its last step commits and applies --max-error-fraction itself."""
    _, _, incoming, index = store
    args = ["score", "--features", str(incoming), "--index", str(index), "--top", "3",
            "--template_location", str(tmp_path / "template.json")]
    assert main([*args, "--output", str(tmp_path / "ok")]) == 0
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert (summary["count_in"], summary["errored"]) == (13, 1)
    assert len((tmp_path / "ok" / "top_anomalies.csv").read_text().splitlines()) == 4
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "over"), "--max-error-fraction",
                 "0.05"]) == 1
    assert "1 of 13 inputs errored (7.7% > --max-error-fraction 5.0%)" in (
        capsys.readouterr().err)
    assert outputs.require_complete(str(tmp_path / "over"), "results")["errored"] == 1
    assert main([*args, "--output", str(tmp_path / "r"), "--report"]) == 1
    assert "--report needs the results" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_embed_commits_in_the_pipeline(store):
    """dn2 embed's marker comes from its pipeline's last step, counted independently."""
    root, _, incoming, _ = store
    marker = outputs.require_complete(str(incoming), "features")
    images = sorted(p.name for p in (root / "incoming").iterdir())
    assert marker["count_in"] == len(images) == marker["embedded"] + marker["errored"]
    assert marker["errored"] == 1 and marker["run_id"].startswith("_staging-")
