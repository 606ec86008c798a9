"""dn2ops.score.spill: buckets the same in every process, spill files of a row group a
bucket."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dn2ops.io import features
from dn2ops.score.spill import SPILL_SCHEMA, bucket_of, n_buckets, read_spilled, write_spill


def test_buckets_are_the_same_in_every_process():
    """A set's bucket must not depend on the process (workers spill, others summarise):
    another interpreter, with another string-hash seed, puts every set in the same bucket."""
    names = [f"lot{i}" for i in range(50)] + ["gs://b/cam-7/2026-12-01", "ü"]
    code = ("import json, sys; from dn2ops.score.spill import bucket_of; "
            "print(json.dumps([bucket_of(n, 13) for n in json.loads(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], check=True,
                         capture_output=True, text=True, env={"PYTHONHASHSEED": "123"},
                         cwd=str(Path(__file__).parents[3]))  # the repository
    mine = [bucket_of(n, 13) for n in names]
    assert json.loads(out.stdout) == mine
    assert len(set(mine)) > 8  # spread over the buckets
    assert [n_buckets(i, 10) for i in (0, 1, 10, 11, 95)] == [1, 1, 1, 2, 10]


def test_spill_file_has_a_row_group_a_bucket(tmp_path):
    """write_spill sorts rows by bucket into one row group each; read_spilled gives back
    exactly a bucket's rows and refuses a row group that is another bucket's."""
    buckets = [3, 0, 3, 1, 0, 3]
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    table = pa.Table.from_pydict(
        {"bucket": buckets, "group": [f"g{b}" for b in buckets],
         "uri": [f"u{i}" for i in range(6)], "backbone": ["test"] * 6,
         "embedding": [list(x) for x in X]}, schema=SPILL_SCHEMA)
    path = str(tmp_path / "spill.parquet")
    parts = write_spill(table, path)
    assert parts == [(0, 0), (1, 1), (3, 2)]
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    for bucket, row_group in parts:
        got = read_spilled(path, row_group, bucket)
        want = [i for i, b in enumerate(buckets) if b == bucket]
        assert got.column("uri").to_pylist() == [f"u{i}" for i in want]  # stable order
        np.testing.assert_array_equal(features.embeddings(got), X[want])
    with pytest.raises(ValueError, match="holds buckets \\[1\\], not 3"):
        read_spilled(path, 1, 3)
