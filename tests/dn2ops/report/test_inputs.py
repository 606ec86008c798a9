"""Reading a results directory: only committed ones, only the columns the report uses."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dn2ops.io import outputs
from dn2ops.report import render_report
from dn2ops.report.inputs import ANOMALY_COLUMNS, read_inputs, read_normal_scores, read_removed
from tests.conftest import make_results_dir


@pytest.fixture
def small(tmp_path):
    return make_results_dir(tmp_path, 100)


def test_reads_the_committed_tables(small):
    inputs = read_inputs(small["results"], small["index"], "label")
    assert inputs.anomalies.column_names == [*ANOMALY_COLUMNS, "label"]
    written = pq.read_table(Path(small["results"]) / "anomalies-00000-of-00002.parquet")
    assert inputs.anomalies.num_rows == 100
    assert inputs.anomalies["uri"].to_pylist()[:50] == written["uri"].to_pylist()
    np.testing.assert_array_equal(inputs.anomalies["score"].to_numpy(), small["scores"])
    assert inputs.errors.column_names == ["uri", "stage", "error"] and len(inputs.errors) == 3
    assert inputs.groups["group"].to_pylist() == ["g0", "g1", "g2", "g3", "g4"]
    assert inputs.summary["scored"] == 100 and inputs.notes == []


def test_missing_label_column_and_group_tables(tmp_path):
    paths = make_results_dir(tmp_path, 10, groups=False, label=False)
    inputs = read_inputs(paths["results"], None, "label")
    assert inputs.anomalies.column_names == list(ANOMALY_COLUMNS)
    assert inputs.groups is None


def test_results_without_anomaly_tables_read_as_empty(small):
    for shard in Path(small["results"]).glob("anomalies-*.parquet"):
        shard.unlink()
    inputs = read_inputs(small["results"], None, "label")
    assert len(inputs.anomalies) == 0
    assert inputs.anomalies.column_names == list(ANOMALY_COLUMNS)


def test_refuses_a_results_dir_that_was_not_committed(small):
    (Path(small["results"]) / outputs.MARKER).unlink()  # a run that stopped mid-way
    with pytest.raises(outputs.OutputError, match="has no _SUCCESS marker: it is not a complete "
                                                  "dn2 results directory"):
        render_report(small["results"])


def test_refuses_other_dn2_outputs_and_missing_dirs(small, tmp_path):
    (Path(small["results"]) / outputs.MARKER).write_text(json.dumps({"kind": "features"}))
    with pytest.raises(outputs.OutputError, match="holds dn2 features output, not results"):
        render_report(small["results"])
    with pytest.raises(outputs.OutputError, match="does not exist"):
        render_report(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(outputs.OutputError, match="no _SUCCESS marker"):
        render_report(str(tmp_path / "empty"))


def test_normal_scores_are_the_kept_images(small):
    scores, note = read_normal_scores(small["index"], None)
    written = pq.read_table(Path(small["index"]) / "normal.parquet")
    np.testing.assert_array_equal(scores, written["loo_score"].to_numpy()[:500])
    assert 99.0 not in scores  # the dropped duplicate
    assert note == f"normal set: {small['index']}"


def test_index_from_argument_or_summary(small, tmp_path):
    summary = json.loads((Path(small["results"]) / "summary.json").read_text())
    assert read_normal_scores(None, summary)[1] == f"normal set: {small['index']}"
    assert read_normal_scores(None, {})[0] is None
    missing = read_normal_scores(None, {"index_dir": str(tmp_path / "nowhere")})
    assert missing[0] is None and "not usable here" in missing[1] and "does not exist" in missing[1]
    with pytest.raises(outputs.OutputError, match="does not exist"):
        read_normal_scores(str(tmp_path / "nowhere"), summary)


def test_uncommitted_index_is_not_used(small):
    (Path(small["index"]) / outputs.MARKER).unlink()
    with pytest.raises(outputs.OutputError, match="no _SUCCESS marker"):
        read_normal_scores(small["index"], None)
    scores, note = read_normal_scores(None, {"index_dir": small["index"]})
    assert scores is None and "no _SUCCESS marker" in note


def test_index_without_normal_scores(small):
    (Path(small["index"]) / "normal.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="normal.parquet"):
        read_normal_scores(small["index"], None)


def test_removed_rows_of_an_index_built_before_clean_scores_were_recorded(small):
    """An index cleaned by --clean-fraction before the cleaning entry and clean_score: its
    removed rows (kept false) are listed, without scores; an index without cleaning: none."""
    index = Path(small["index"])
    assert read_removed(small["index"], None) is None  # the fixture's marker: no cleaning
    (index / outputs.MARKER).write_text(json.dumps({"kind": "index", "clean_fraction": 0.1}))
    removed = read_removed(small["index"], None)
    assert removed.cleaning == {"rule": "fraction", "fraction": 0.1}
    assert removed.n == 1 and removed.rows == [{"uri": "normal_500.png", "clean_score": None}]
    assert removed.where == f"{small['index']}/normal.parquet"
    assert read_inputs(small["results"], small["index"], "label").removed == removed
