"""dn2ops.io.result_tables: the schema file against what dn2 really writes.

The Parquet files come from real ``dn2 score`` runs (tests/pipelines/nights.py); each
mutation below is one a code change could make, and each must be caught."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dn2ops.io import features, result_tables
from dn2ops.io.result_tables import SchemaDrift, bigquery_names, check_parquet
from dn2ops.score.images import anomaly_schema
from dn2ops.score.sets import group_schema
from pipelines.cli import main
from pipelines.graphs import RESULT_ERROR_SCHEMA
from tests.pipelines.nights import EXTRAS, NIGHTS, make_nights, score_night

DAY = next(iter(NIGHTS))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A night's committed results directory, written by dn2 score."""
    root = tmp_path_factory.mktemp("drift")
    make_nights(root)
    assert score_night(root, DAY) == 0
    return root / "results" / f"dt={DAY}"


def test_the_schema_file_is_what_the_writers_write():
    assert result_tables.arrow_schema("anomalies", EXTRAS).equals(anomaly_schema(EXTRAS))
    assert result_tables.arrow_schema("sets").equals(group_schema())
    assert result_tables.arrow_schema("errors").equals(RESULT_ERROR_SCHEMA)
    assert result_tables.schema_version() == 1


def test_each_bigquery_field_is_its_arrow_type():
    bq_type = {"string": "STRING", "double": "FLOAT", "int64": "INTEGER", "int32": "INTEGER",
               "bool": "BOOLEAN"}
    for name, spec in result_tables.tables().items():
        for f in spec["fields"]:
            arrow = f["arrow"]
            item = arrow[len("list<item: "):-1] if arrow.startswith("list<") else None
            assert (f["type"], f["mode"]) == ((bq_type[item], "REPEATED") if item
                                              else (bq_type[arrow], "NULLABLE")), (name, f)


def test_dn2s_own_parquet_passes_and_records_the_version(results):
    for table, prefix in (("anomalies", "anomalies"), ("errors", "errors")):
        for path in features.shard_paths(str(results), prefix):
            extras = check_parquet(table, pq.read_schema(path), path)
            assert extras == (list(EXTRAS) if table == "anomalies" else [])
    summary = json.loads((results / "summary.json").read_text())
    marker = json.loads((results / "_SUCCESS").read_text())
    assert summary["schema_version"] == marker["schema_version"] == 1


def _mutate(table: pa.Table, how: str) -> pa.Table:
    i = table.schema.get_field_index
    if how == "float32 distances":
        return table.set_column(i("neighbor_distances"), "neighbor_distances", pc.cast(
            table["neighbor_distances"], pa.list_(pa.float32())))
    if how == "dropped hot_box":
        return table.drop_columns(["hot_box"])
    if how == "renamed p_value":
        return table.rename_columns(["pvalue" if n == "p_value" else n
                                     for n in table.column_names])
    if how == "swapped score and rank":
        names = table.column_names
        a, b = i("score"), i("rank")
        names[a], names[b] = names[b], names[a]
        return table.select(names)
    if how == "int64 label":
        return table.set_column(i("label"), "label", pc.cast(table["label"], pa.int64()))
    raise ValueError(how)


@pytest.mark.parametrize("how, caught", [
    ("float32 distances", "column 'neighbor_distances' is list<element: float>, expected "
                          "list<item: double>"),
    ("dropped hot_box", "column 14 is 'label', expected 'hot_box' ('hot_box' is missing"),
    ("renamed p_value", "column 4 is 'pvalue', expected 'p_value' ('p_value' is missing"),
    ("swapped score and rank", "column 1 is 'rank', expected 'score' ('score' is at "
                               "position 2"),
    ("int64 label", "manifest column 'label' is int64, expected string"),
])
def test_a_drifted_parquet_file_is_caught_and_not_loaded(results, tmp_path, capsys, how,
                                                         caught):
    mutated = tmp_path / "results"
    shutil.copytree(results, mutated)
    path = features.shard_paths(str(mutated), "anomalies")[0]
    pq.write_table(_mutate(pq.read_table(path), how), path)
    with pytest.raises(SchemaDrift, match=caught.replace("(", r"\(").replace("[", r"\[")):
        check_parquet("anomalies", pq.read_schema(path), path)
    # dn2 load-bigquery checks before it reaches BigQuery: no server is needed here
    assert main(["load-bigquery", str(mutated), "--bigquery-table", "p.d.t"]) == 3
    assert caught in capsys.readouterr().err


def test_manifest_columns_are_renamed_by_the_documented_rule():
    names = ["label", "class", "my col", "Score", "2x", "_PARTITIONTIME", "partition_date",
             "my_col", "é", "x" * 310]
    assert bigquery_names("anomalies", names) == {
        "label": "label", "class": "class", "my col": "my_col",
        "Score": "manifest_Score",  # clashes with dn2's score, ignoring case
        "2x": "m_2x", "_PARTITIONTIME": "m__PARTITIONTIME",  # a digit, a reserved prefix
        "partition_date": "manifest_partition_date",  # the tables' partitioning column
        "my_col": "manifest_my_col",  # clashes with the renamed 'my col'
        "é": "_", "x" * 310: "x" * 300}
    # a chain of clashes ends with a number
    assert bigquery_names("errors", ["a b", "a-b", "a_b"]) == {
        "a b": "a_b", "a-b": "manifest_a_b", "a_b": "manifest_a_b_2"}
