"""pipelines.graphs: the graphs on Beam's TestPipeline, over real Parquet files."""

from __future__ import annotations

import functools
import json
import uuid
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from dn2ops.io import features, outputs
from pipelines import graphs
from pipelines.options import LOCAL_RUNNER

D = 3


def _rows(n: int, extra: bool = False) -> list[dict]:
    """Feature rows as dn2 embed's stage yields them: embeddings are float32 arrays."""
    rows = [{"uri": f"u{i:02d}", "sha256": f"h{i}", "backbone": "toy", "dim": D,
             "embedding": np.arange(i * D, (i + 1) * D, dtype=np.float32) / 7}
            for i in range(n)]
    return [{**r, "lot": f"L{i % 2}"} for i, r in enumerate(rows)] if extra else rows


def _as_lists(rows: list[dict]) -> list[tuple]:
    return [(r["uri"], np.asarray(r["embedding"], np.float32).tolist()) for r in rows]


ERRORS = [{"uri": "bad.png", "stage": "decode", "error": "empty file (0 bytes)"}]


def test_as_batches_turns_rows_into_record_batches_of_the_feature_schema():
    rows = _rows(10, extra=True)
    schema = features.feature_schema(["lot"])
    with BeamTestPipeline(runner=LOCAL_RUNNER) as p:
        batches = graphs.as_batches(p | beam.Create(rows), ["lot"], batch_size=4)
        fit = (batches
               | "Fit" >> beam.Map(lambda b: b.num_rows <= 4 and b.schema.equals(schema))
               | beam.Distinct())
        got = (batches | "Rows" >> beam.FlatMap(lambda b: b.to_pylist())
               | "Fields" >> beam.Map(lambda r: (r["uri"], r["lot"], r["embedding"])))
        assert_that(fit, equal_to([True]), label="fit")
        assert_that(got, equal_to([(r["uri"], r["lot"], r["embedding"].tolist())
                                   for r in rows]))


def _committed_features(directory: Path, rows: list[dict]) -> None:
    """A committed features directory: two feature shards and an errors shard."""
    staging = Path(outputs.new_staging(str(directory)))
    staging.mkdir(parents=True)
    schema = features.feature_schema()
    for s, part in enumerate((rows[:6], rows[6:])):
        pq.write_table(pa.Table.from_batches([features.rows_batch(part, schema)]),
                       staging / f"features-{s:05d}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ERRORS, schema=features.ERROR_SCHEMA),
                   staging / "errors-00000-of-00001.parquet")
    outputs.commit(str(staging), str(directory), {"kind": features.KIND, "dim": D})


def test_read_features_reads_the_committed_shards_and_counts_every_row(tmp_path):
    rows = _rows(9)
    _committed_features(tmp_path / "f", rows)
    # a stray shard beside the committed ones (a crashed writer's) is not read
    stray = features.rows_batch(_rows(2), features.feature_schema())
    pq.write_table(pa.Table.from_batches([stray]),
                   tmp_path / "f" / "features-00002-of-00003.parquet")
    with BeamTestPipeline(runner=LOCAL_RUNNER) as p:
        feats, errors, total = graphs.read_features(p, str(tmp_path / "f"))
        got = (feats | "Rows" >> beam.FlatMap(lambda b: b.to_pylist())
               | "Fields" >> beam.Map(lambda r: (r["uri"], r["embedding"])))
        assert_that(got, equal_to(_as_lists(rows)), label="features")
        assert_that(errors, equal_to(ERRORS), label="errors")
        assert_that(total, equal_to([len(rows) + len(ERRORS)]), label="total")


def _record(count_in: int, *, staging: str, calls: str, **counts) -> dict:
    """A last step that notes what it found in ``staging`` when it ran, one file a call."""
    found = {prefix: sum(pq.read_metadata(p).num_rows
                         for p in Path(staging).glob(f"{prefix}-*.parquet"))
             for prefix in ("features", "errors")}
    call = {"count_in": count_in, **counts, "rows": found}
    (Path(calls) / uuid.uuid4().hex).write_text(json.dumps(call))
    return call


def test_finalize_runs_its_step_once_after_every_write(tmp_path):
    rows = _rows(12, extra=True)
    staging, calls = tmp_path / "_staging-test", tmp_path / "calls"
    calls.mkdir()
    step = functools.partial(_record, staging=str(staging), calls=str(calls))
    expected = {"count_in": 13, "reused": 2, "rows": {"features": 12, "errors": 1}}
    with BeamTestPipeline(runner=LOCAL_RUNNER) as p:
        written = graphs.write_features(p | "Feats" >> beam.Create(rows),
                                        p | "Errors" >> beam.Create(ERRORS), str(staging),
                                        ["lot"])
        count_in = p | "CountIn" >> beam.Create([13])
        reused = p | "Reused" >> beam.Create([2])
        done = graphs.finalize(p, step, count_in=count_in, written=written,
                               counts={"reused": reused})
        assert_that(done, equal_to([expected]))
    assert [json.loads(c.read_text()) for c in calls.iterdir()] == [expected]
    table = pa.concat_tables(pq.read_table(p) for p in sorted(staging.glob("features-*")))
    assert sorted(_as_lists(table.to_pylist())) == sorted(_as_lists(rows))
    assert sorted(zip(table.column("uri").to_pylist(), table.column("lot").to_pylist(),
                      strict=True)) == [(r["uri"], r["lot"]) for r in rows]
