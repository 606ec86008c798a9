"""dn2ops.streams: chunk streams regrouped, sampled and tapped, against plain numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dn2ops import streams

X = np.arange(40, dtype=np.float32).reshape(20, 2)
CHUNKS = [X[:7], X[7:8], X[8:20]]


def test_rechunk_regroups_rows_in_order():
    out = list(streams.rechunk(iter(CHUNKS), [5, 5, 10]))
    assert [len(o) for o in out] == [5, 5, 10]
    np.testing.assert_array_equal(np.concatenate(out), X)
    with pytest.raises(ValueError, match="fewer rows"):
        list(streams.rechunk(iter(CHUNKS), [5, 20]))
    with pytest.raises(ValueError, match="more rows"):
        list(streams.rechunk(iter(CHUNKS), [5, 5]))


def test_tap_copies_the_rows_of_each_id_set_while_passing_the_stream_through():
    a, b = np.array([0, 7, 8, 19]), np.array([3, 4])
    tap = streams.Tap(iter(CHUNKS), a, None, b)
    passed = list(tap)
    assert len(passed) == 3 and all(p is c for p, c in zip(passed, CHUNKS, strict=True))
    np.testing.assert_array_equal(tap.rows(0), X[a])
    assert tap.rows(1) is None
    np.testing.assert_array_equal(tap.rows(2), X[b])
    np.testing.assert_array_equal(streams.gather_rows(iter(CHUNKS), a), X[a])
    with pytest.raises(ValueError, match="asked for 1 rows"):
        streams.gather_rows(iter(CHUNKS), np.array([25]))


def test_sample_ids_are_sorted_unique_seeded_and_all_when_asked_for_more():
    ids = streams.sample_ids(1000, 100, seed=7)
    assert len(ids) == 100 == len(np.unique(ids)) and (np.diff(ids) > 0).all()
    np.testing.assert_array_equal(ids, streams.sample_ids(1000, 100, seed=7))
    assert not np.array_equal(ids, streams.sample_ids(1000, 100, seed=8))
    np.testing.assert_array_equal(streams.sample_ids(10, None, 0), np.arange(10))
    np.testing.assert_array_equal(streams.sample_ids(10, 50, 0), np.arange(10))


def test_drop_self_removes_each_querys_own_id_or_its_last_neighbour():
    D = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0], [1.0, 2.0, 4.0]])
    I = np.array([[5, 6, 7], [9, 8, 4], [1, 2, 3]])
    D2, I2 = streams.drop_self(D, I, np.array([5, 8, 0]))
    # row 0: itself first; row 1: a duplicate at distance 0 before it; row 2: not found
    np.testing.assert_array_equal(I2, [[6, 7], [9, 4], [1, 2]])
    np.testing.assert_array_equal(D2, [[1.0, 2.0], [0.0, 3.0], [1.0, 2.0]])


def test_percentile_error_is_the_dkw_bound_in_points():
    assert streams.percentile_error(None) == 0.0
    # sqrt(ln(2 / 0.05) / (2 * 20000)) = sqrt(3.6889 / 40000) = 0.0096 -> 0.96 points
    assert streams.percentile_error(20_000) == pytest.approx(
        100 * math.sqrt(math.log(40) / 40_000))
    assert streams.percentile_error(20_000) == pytest.approx(0.9603, abs=1e-4)
    assert streams.percentile_error(4000) == pytest.approx(2.147, abs=1e-3)
