"""--bigquery-table and dn2 load-bigquery against a real BigQuery API: bqemulator on
127.0.0.1 (tests/bigquery_emulator.py), reached through BIGQUERY_EMULATOR_HOST alone.

Each night is scored by a real ``dn2 score`` (tests/pipelines/nights.py); what BigQuery
holds afterwards is compared with the committed Parquet files, read by pyarrow."""

from __future__ import annotations

import json
import uuid

import pyarrow.parquet as pq
import pytest

from dn2ops.io import bigquery, features, outputs, result_tables
from pipelines.cli import main
from tests.pipelines.nights import NIGHTS, make_nights, score_night

pytestmark = pytest.mark.bigquery

PROJECT = "dn2-test"


@pytest.fixture(scope="module")
def bq(bigquery_emulator):
    """(client, dataset) on the emulator, BIGQUERY_EMULATOR_HOST set for the module."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in bigquery_emulator.env.items():
            mp.setenv(k, v)
        client = bigquery_emulator.client(PROJECT)
        dataset = f"dn2_{uuid.uuid4().hex[:8]}"
        client.create_dataset(dataset)
        yield client, dataset


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    root = tmp_path_factory.mktemp("nights")
    return root, make_nights(root)


def _rows(client, sql: str) -> list[dict]:
    return [dict(r.items()) for r in client.query(sql).result()]


def _counts(client, ref: str) -> dict[str, int]:
    return {str(r["d"]): r["n"] for r in _rows(
        client, f"SELECT partition_date AS d, COUNT(*) AS n FROM `{ref}` GROUP BY 1")}


def test_reruns_replace_their_partition_and_other_nights_add_theirs(bq, nights, capsys):
    client, dataset = bq
    root, made = nights
    table = f"{PROJECT}.{dataset}.anomalies"
    day1, day2, day3 = NIGHTS
    for day in (day1, day1):  # a night scored twice (a rerun)
        assert score_night(root, day, "--bigquery-table", table) == 0
    assert _counts(client, table) == {day1: made[day1]["scored"]}
    assert _counts(client, table + "_errors") == {day1: made[day1]["errored"]}
    assert score_night(root, day2, "--bigquery-table", table) == 0
    assert _counts(client, table) == {day1: made[day1]["scored"], day2: made[day2]["scored"]}
    # a committed night loaded again without scoring it again: nothing changes
    assert main(["load-bigquery", str(root / "results" / f"dt={day1}"),
                 "--bigquery-table", table]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tables"] == {table: made[day1]["scored"],
                                 table + "_errors": made[day1]["errored"]}
    assert _counts(client, table) == {day1: made[day1]["scored"], day2: made[day2]["scored"]}
    assert _counts(client, table + "_errors") == {day1: made[day1]["errored"],
                                                  day2: made[day2]["errored"]}
    # no staging table is left behind
    assert sorted(t.table_id for t in client.list_tables(dataset)) == [
        "anomalies", "anomalies_errors"]
    assert day3  # loaded by the group-mode test


def test_loaded_rows_and_schema_match_the_committed_parquet(bq, nights):
    client, dataset = bq
    root, made = nights
    table = f"{PROJECT}.{dataset}.anomalies"
    day = next(iter(NIGHTS))
    if score_night(root, day, "--bigquery-table", table) != 0:
        pytest.fail("dn2 score --bigquery-table failed")
    loaded = client.get_table(table)
    modes = {f.name: (f.field_type, f.mode) for f in loaded.schema}
    # Parquet lists became REPEATED fields (enable_list_inference), not records
    assert modes["neighbor_uris"] == ("STRING", "REPEATED")
    assert modes["neighbor_distances"] in {("FLOAT", "REPEATED"), ("FLOAT64", "REPEATED")}
    assert modes["hot_box"] in {("INTEGER", "REPEATED"), ("INT64", "REPEATED")}
    assert modes["partition_date"] == ("DATE", "REQUIRED")
    assert loaded.time_partitioning.field == "partition_date"
    # fixed columns in the schema file's order, partition_date, then the manifest columns,
    # renamed by the documented rule and the mapping recorded
    assert [f.name for f in loaded.schema] == (
        result_tables.fixed_names("anomalies") + ["partition_date", "label", "class",
                                                  "my_col", "manifest_Score"])
    assert {f.name: f.description for f in loaded.schema}["my_col"] == "manifest column 'my col'"
    meta = json.loads(loaded.description.splitlines()[1])
    assert meta["dn2_schema_version"] == result_tables.schema_version() == 1
    assert meta["renamed_manifest_columns"] == {"my col": "my_col", "Score": "manifest_Score"}
    assert "schema_version 1" in loaded.description.splitlines()[0]
    # the values, row by row, against the Parquet file read by pyarrow
    parquet = features.read_table(str(root / "results" / f"dt={day}"), "anomalies")
    expected = {r["uri"]: r for r in parquet.to_pylist()}
    got = _rows(client, f"SELECT * FROM `{table}` WHERE partition_date = DATE '{day}'")
    assert sorted(r["uri"] for r in got) == sorted(expected) == sorted(made[day]["uris"])
    for r in got:
        e = expected[r["uri"]]
        assert r["neighbor_uris"] == e["neighbor_uris"]
        assert r["neighbor_distances"] == pytest.approx(e["neighbor_distances"])
        assert (r["score"], r["rank"], r["label"], r["my_col"], r["manifest_Score"]) == (
            pytest.approx(e["score"]), e["rank"], e["label"], e["my col"], e["Score"])
        assert r["hot_box"] == []  # null lists (no heatmap) read as empty arrays
        assert str(r["partition_date"]) == day


def test_group_mode_loads_sets_and_clears_the_image_rows_of_its_night(bq, nights):
    client, dataset = bq
    root, made = nights
    table = f"{PROJECT}.{dataset}.anomalies"
    day = list(NIGHTS)[2]
    assert score_night(root, day, "--bigquery-table", table) == 0
    assert _counts(client, table)[day] == made[day]["scored"]
    # the same night rescored as sets (by the 'class' manifest column: c0, c1, c2)
    assert score_night(root, day, "--bigquery-table", table, "--group-by", "class",
                       "--group-score", "covtrace", index=False) == 0
    groups = features.read_table(str(root / "results" / f"dt={day}"), "groups")
    got = _rows(client, f"SELECT `group`, size, member_uris FROM `{table}_sets` "
                        f"WHERE partition_date = DATE '{day}'")
    assert sorted((r["group"], r["size"], sorted(r["member_uris"])) for r in got) == sorted(
        (g["group"], g["size"], sorted(g["member_uris"])) for g in groups.to_pylist())
    assert _counts(client, table).get(day) is None  # this night holds sets now, no images
    assert [f.name for f in client.get_table(table + "_sets").schema][:-1] == (
        result_tables.fixed_names("sets"))


def test_a_failed_load_keeps_the_committed_results_and_exits_3(bq, nights, capsys):
    client, dataset = bq
    root, made = nights
    day = next(iter(NIGHTS))
    # a table of the same name that dn2 did not make: the load is refused after the commit
    from google.cloud import bigquery as gbq

    foreign = f"{PROJECT}.{dataset}.foreign"
    client.create_table(gbq.Table(foreign, schema=[gbq.SchemaField("uri", "STRING")]))
    assert score_night(root, day, "--bigquery-table", foreign) == bigquery.LOAD_FAILED_EXIT == 3
    err = capsys.readouterr().err
    results = str(root / "results" / f"dt={day}")
    assert f"dn2 load-bigquery {results} --bigquery-table {foreign}" in err
    assert outputs.require_complete(results, "results")["scored"] == made[day]["scored"]
    assert pq.read_metadata(features.shard_paths(results, "anomalies")[0]).num_rows > 0
    assert _rows(client, f"SELECT COUNT(*) AS n FROM `{foreign}`") == [{"n": 0}]
    # a dataset that does not exist: BigQuery's own refusal, the same exit status
    assert main(["load-bigquery", results, "--bigquery-table",
                 f"{PROJECT}.no_such_dataset.t"]) == 3
    assert "the committed results are unchanged" in capsys.readouterr().err


def test_score_refuses_a_table_whose_dataset_is_missing_before_any_work(bq, nights, capsys):
    root, _ = nights
    day = next(iter(NIGHTS))
    out = root / "refused"
    assert main(["score", "--features", str(root / "incoming" / f"dt={day}"), "--index",
                 str(root / "index"), "--output", str(out), "--partition", day,
                 "--bigquery-table", f"{PROJECT}.no_such_dataset.t"]) == 1
    assert "cannot read dataset" in capsys.readouterr().err
    assert not out.exists()


def test_the_emulator_host_may_be_given_without_a_scheme(bq, bigquery_emulator, monkeypatch):
    client, dataset = bq
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", bigquery_emulator.url.split("://", 1)[1])
    assert bigquery.client(PROJECT).get_dataset(f"{PROJECT}.{dataset}").dataset_id == dataset


def test_a_load_refused_in_its_transaction_leaves_every_table_as_it_was(bq, nights,
                                                                         capsys):
    client, dataset = bq
    root, made = nights
    from google.cloud import bigquery as gbq

    table = f"{PROJECT}.{dataset}.atomic"
    day1, day2, _ = NIGHTS
    assert score_night(root, day1, "--bigquery-table", table) == 0
    before = sorted(r["uri"] for r in _rows(client, f"SELECT uri FROM `{table}`"))
    # TABLE_errors altered behind dn2's back: its `stage` is an INTEGER now
    errors = client.get_table(table + "_errors")
    client.delete_table(errors)
    altered = gbq.Table(errors.reference, schema=[
        gbq.SchemaField("stage", "INTEGER") if f.name == "stage" else f
        for f in errors.schema])
    altered.time_partitioning, altered.description = (errors.time_partitioning,
                                                      errors.description)
    client.create_table(altered)
    # the other night's rows, scored as night 1: the load fails at the errors' INSERT
    other = root / "other"
    assert main(["score", "--features", made[day2]["features"], "--index",
                 str(root / "index"), "--output", str(other), "--partition", day1,
                 "--explain", "0"]) == 0
    assert main(["load-bigquery", str(other), "--bigquery-table", table]) == 3
    err = capsys.readouterr().err
    assert "the committed results are unchanged" in err
    assert "BadRequest" in err  # the errors' INSERT: a STRING into an INTEGER column
    # the ranked table's DELETE and INSERT, in the same transaction, did not happen
    assert sorted(r["uri"] for r in _rows(client, f"SELECT uri FROM `{table}`")) == before
    assert len(before) == made[day1]["scored"] != made[day2]["scored"]
    assert _counts(client, table + "_errors") == {}
