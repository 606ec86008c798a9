"""dn2ops.reuse.Known: digests looked up against a plain dict built by hand."""

from __future__ import annotations

import hashlib

import numpy as np

from dn2ops.reuse import Known, Location, _digests


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
