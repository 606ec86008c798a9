"""--bigquery-table refused before any work, and dn2's exit statuses (README, "Exit codes");
the loads themselves: tests/pipelines/test_bigquery.py (a real BigQuery API)."""

from __future__ import annotations

import pytest

from dn2ops.io.bigquery import LOAD_FAILED_EXIT
from pipelines.cli import main


def _score(tmp_path, *extra):
    return ["score", "--features", str(tmp_path / "f"), "--index", str(tmp_path / "i"),
            "--output", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("extra, says", [
    ((), "needs --partition to be a date"),
    (("--partition", "nightly"), "got 'nightly'"),
    (("--partition", "2024-02-30"), "got '2024-02-30'"),
    (("--partition", "2024-06-01", "--bigquery-table", "p.d"), "expected PROJECT.DATASET"),
])
def test_bigquery_table_without_a_date_partition_is_refused_before_any_work(
        tmp_path, capsys, extra, says):
    table = [] if "--bigquery-table" in extra else ["--bigquery-table", "p.d.t"]
    for command in (_score(tmp_path, *table, *extra),
                    ["run", "--normal", str(tmp_path / "n"), "--input", str(tmp_path / "f"),
                     "--output", str(tmp_path / "out"), *table, *extra]):
        with pytest.raises(SystemExit) as exit_:
            main(command)
        assert exit_.value.code == 2
        assert says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_today_and_yesterday_are_dates(tmp_path):
    from pipelines import options

    for day in ("today", "yesterday"):
        args, _ = options.parse("score", _score(tmp_path, "--partition", day,
                                                "--bigquery-table", "p.d.t")[1:])
        assert len(args.partition) == 10 and args.bigquery_table == "p.d.t"


def test_a_template_launch_with_bigquery_table_is_refused_before_any_work(tmp_path, capsys):
    assert main(_score(tmp_path, "--partition", "2024-06-01", "--bigquery-table", "p.d.t",
                       "--template_location", str(tmp_path / "t.json"))) == 1
    assert "a template launch does not wait for" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_load_bigquery_of_a_directory_that_is_not_committed_is_the_users_mistake(tmp_path,
                                                                                 capsys):
    assert main(["load-bigquery", str(tmp_path), "--bigquery-table", "p.d.t"]) == 1
    assert "has no _SUCCESS marker" in capsys.readouterr().err
    assert LOAD_FAILED_EXIT == 3
