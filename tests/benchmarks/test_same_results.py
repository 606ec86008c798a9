"""benchmarks/same_results.py: the refactoring check says SAME only for equal tables."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import same_results


def _results(path, scores, index_id="a"):
    path.mkdir()
    n = len(scores)
    pq.write_table(pa.table({"uri": [f"u{i}" for i in range(n)], "score": scores,
                             "rank": list(range(1, n + 1)), "index_id": [index_id] * n}),
                   path / "anomalies-00000-of-00001.parquet")
    return str(path)


def test_equal_tables_are_the_same_whatever_their_index_id(tmp_path, capsys):
    a = _results(tmp_path / "a", [3.0, 2.0, 1.0], index_id="run1")
    b = _results(tmp_path / "b", [3.0, 2.0, 1.0], index_id="run2")
    assert same_results.main([a, b]) == 0
    assert "'index_id_equal': False" in capsys.readouterr().out


def test_a_changed_score_or_a_missing_row_is_different(tmp_path):
    a = _results(tmp_path / "a", [3.0, 2.0, 1.0])
    assert same_results.main([a, _results(tmp_path / "b", [3.0, 2.0, 1.5])]) == 1
    assert same_results.main([a, _results(tmp_path / "c", [3.0, 2.0])]) == 1
