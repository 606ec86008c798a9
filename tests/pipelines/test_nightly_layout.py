"""The nightly layout results/dt=YYYY-MM-DD/ read as one table: the README's DuckDB query
over three nights made by dn2 score, with a stray shard and a night caught mid-commit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import pytest

from tests.pipelines.nights import NIGHTS, make_nights, score_night

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_query() -> str:
    """The SQL block after the README's ``<!-- duckdb-all-nights -->`` marker."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- duckdb-all-nights -->\s*```sql\n(.*?)```", text, re.S)
    assert found, "README.md lost its DuckDB example"
    return found.group(1)


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    make_nights(root)
    for day in NIGHTS:
        assert score_night(root, day) == 0
    return root


def test_the_readme_query_counts_each_committed_night_once(nights, monkeypatch):
    results = nights / "results"
    first, *_, last = NIGHTS
    # a stray shard that no _SUCCESS lists (a crashed commit's leftover) ...
    shard = next((results / f"dt={first}").glob("anomalies-*.parquet"))
    shutil.copy(shard, shard.with_name("anomalies-00001-of-00002.parquet"))
    # ... and a night caught mid-commit: its files copied, _SUCCESS not yet written
    shutil.copytree(results / f"dt={last}", results / "dt=2024-06-04")
    (results / "dt=2024-06-04" / "_SUCCESS").rename(results / "dt=2024-06-04" / "_COMMITTING")
    monkeypatch.chdir(nights)
    rows = duckdb.sql(readme_query()).fetchall()
    print(duckdb.sql(readme_query()))  # the output, as a user sees it (pytest -s)
    expected = {day: json.loads((results / f"dt={day}" / "summary.json").read_text())
                for day in NIGHTS}
    assert [(str(r[0]), r[1], r[2]) for r in rows] == [
        (day, s["scored"], s["flags"]["flagged"]) for day, s in expected.items()]
    assert [r[1] for r in rows] == [n for n, _ in NIGHTS.values()]
    # what a plain glob sees instead: the stray shard and the half-committed night
    naive = duckdb.sql("SELECT dt, count(*) FROM read_parquet('results/dt=*/anomalies-*"
                       ".parquet', hive_partitioning = true) GROUP BY dt ORDER BY dt"
                       ).fetchall()
    assert [r[1] for r in naive] == [2 * NIGHTS[first][0], *[n for n, _ in
                                                             list(NIGHTS.values())[1:]],
                                     NIGHTS[last][0]]
