"""dn2ops.embed.reuse.Known: digests looked up against a plain dict built by hand."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dn2ops.embed.reuse import Known, Location, _digests
from dn2ops.io.features import MetadataMismatch


def _hex(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_find_gives_the_first_row_of_each_digest_in_shard_then_row_order():
    rng = np.random.default_rng(0)
    # 3 shards of 40 rows drawn from 50 images: many repeats, across and within shards
    ids = rng.integers(0, 50, size=(3, 40))
    hexes = [_hex(int(i)) for i in ids.ravel()]
    shards = np.repeat(np.arange(3, dtype=np.int32), 40)
    rows = np.tile(np.arange(40, dtype=np.int64), 3)
    known = Known(_digests(hexes), shards, rows)
    expected: dict[str, Location] = {}
    for h, s, r in zip(hexes, shards, rows, strict=True):
        expected.setdefault(h, Location(int(s), int(r)))
    assert len(known) == len(expected)
    for h, loc in expected.items():
        assert known.find(h) == loc
    assert known.find(_hex(10_000)) is None


def test_digests_with_zero_bytes_at_either_end_are_told_apart():
    a = "00" * 31 + "01"
    b = "01" + "00" * 31
    c = "00" * 32
    known = Known(_digests([a, b]), np.array([0, 0], np.int32), np.array([0, 1], np.int64))
    assert known.find(a) == Location(0, 0)
    assert known.find(b) == Location(0, 1)
    assert known.find(c) is None


def test_an_empty_directory_knows_nothing():
    known = Known(_digests([]), np.zeros(0, np.int32), np.zeros(0, np.int64))
    assert len(known) == 0
    assert known.find(_hex(1)) is None


def test_copy_features_copies_each_known_row_under_its_new_key(tmp_path):
    """CopyFeatures on the FnApiRunner: rows come from the earlier shards (toy vectors,
    checked against the array written), under the new uri and manifest columns, as
    record batches of the feature schema with those columns; an image known twice (two
    uris, one digest) gets two rows."""
    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import BeamAssertException, assert_that

    from dn2ops.embed.reuse import CopyFeatures
    from dn2ops.io.features import embeddings, feature_schema
    from dn2ops.rows import ImageKey
    from tests.conftest import clustered, write_features

    X = clustered(50, seed=4)
    write_features(tmp_path / "earlier", X, [20, 30])
    with pytest.raises(MetadataMismatch, match="not sha256 hex digests"):
        Known.load(str(tmp_path / "earlier"))  # toy digests "h{i}": not dn2 shards
    wanted = {"new/a.png": 3, "new/b.png": 27, "new/c.png": 27, "new/d.png": 49}
    pairs = [(ImageKey(uri, f"h{i}", (("batch", uri[-5]),)),
              Location(0, i) if i < 20 else Location(1, i - 20))
             for uri, i in wanted.items()]

    def check(batches):
        if any(b.schema != feature_schema(["batch"]) for b in batches):
            raise BeamAssertException(f"schemas {[b.schema for b in batches]}")
        table = pa.Table.from_batches(batches)
        got = {r["uri"]: (r, x) for r, x in zip(table.drop(["embedding"]).to_pylist(),
                                                embeddings(table), strict=True)}
        if set(got) != set(wanted) or table.num_rows != len(wanted):
            raise BeamAssertException(f"uris {sorted(got)}")
        for uri, i in wanted.items():
            r, x = got[uri]
            if (r["sha256"], r["batch"], r["backbone"], r["dim"]) != (f"h{i}", uri[-5], "toy",
                                                                       8):
                raise BeamAssertException(f"row {r}")
            if not np.array_equal(x, X[i]):
                raise BeamAssertException(f"embedding of {uri}")

    with TestPipeline(runner="FnApiRunner") as p:
        rows = (p | beam.Create(pairs, reshuffle=False)
                | CopyFeatures(str(tmp_path / "earlier"), "toy", extra_columns=["batch"]))
        assert_that(rows, check)
