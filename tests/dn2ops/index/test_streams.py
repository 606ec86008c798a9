"""dn2ops.index.streams: chunked passes over a normal set, against whole-array numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dn2ops.index import streams


def _blocks(X: np.ndarray, sizes: list[int]):
    bounds = np.cumsum([0] + sizes)
    return [X[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def test_rechunk_regroups_rows_in_order():
    X = np.arange(40, dtype=np.float32).reshape(20, 2)
    out = list(streams.rechunk(_blocks(X, [3, 9, 1, 7]), [5, 5, 10]))
    assert [len(o) for o in out] == [5, 5, 10]
    np.testing.assert_array_equal(np.concatenate(out), X)
    with pytest.raises(ValueError, match="more rows"):
        list(streams.rechunk(_blocks(X, [20]), [5, 5]))
    with pytest.raises(ValueError, match="fewer rows"):
        list(streams.rechunk(_blocks(X, [20]), [15, 10]))


def test_split_cuts_the_rows_into_parts_of_pieces_without_joining_them():
    X = np.arange(40, dtype=np.float32).reshape(20, 2)
    blocks = _blocks(X, [3, 9, 1, 7])
    parts = [list(p) for p in streams.split(blocks, [5, 5, 10])]
    assert [[len(x) for x in p] for p in parts] == [[3, 2], [5], [2, 1, 7]]
    for got, want in zip(parts, streams.rechunk(blocks, [5, 5, 10]), strict=True):
        np.testing.assert_array_equal(np.concatenate(got), want)
    assert all(np.shares_memory(x, X) for p in parts for x in p)  # views, not copies
    # a part left unread is skipped: the next part starts where it should
    parts = streams.split(blocks, [5, 5, 10])
    np.testing.assert_array_equal(next(next(parts)), X[:3])  # the first part, half read
    next(parts)  # the second, not read at all
    np.testing.assert_array_equal(np.concatenate(list(next(parts))), X[10:])
    with pytest.raises(ValueError, match="more rows"):
        [list(p) for p in streams.split(_blocks(X, [20]), [5, 5])]
    with pytest.raises(ValueError, match="fewer rows"):
        [list(p) for p in streams.split(_blocks(X, [20]), [15, 10])]


def test_tap_copies_the_rows_of_each_id_set_during_one_pass():
    X = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    a, b = np.array([0, 7, 8, 29]), np.array([12])
    tap = streams.Tap(iter(_blocks(X, [8, 1, 21])), a, None, b)
    passed = np.concatenate(list(tap))
    np.testing.assert_array_equal(passed, X)  # the stream goes on unchanged
    np.testing.assert_array_equal(tap.rows(0), X[a])
    assert tap.rows(1) is None
    np.testing.assert_array_equal(tap.rows(2), X[b])
    np.testing.assert_array_equal(streams.gather_rows(_blocks(X, [4] * 7 + [2]), a), X[a])


def test_sample_ids_are_sorted_unique_and_seeded():
    ids = streams.sample_ids(1000, 50, seed=3)
    assert len(ids) == 50 and len(set(ids.tolist())) == 50
    assert (np.diff(ids) > 0).all() and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, streams.sample_ids(1000, 50, seed=3))
    np.testing.assert_array_equal(streams.sample_ids(10, None, seed=3), np.arange(10))
    np.testing.assert_array_equal(streams.sample_ids(10, 99, seed=3), np.arange(10))


def test_drop_self_removes_each_query_itself_or_the_last_column():
    D = np.array([[0.0, 1.0, 2.0], [0.5, 0.7, 0.9]], np.float32)
    I = np.array([[4, 1, 2], [3, 5, 6]])
    Dk, Ik = streams.drop_self(D, I, np.array([4, 9]))  # row 1's own id 9 is not there
    np.testing.assert_array_equal(Ik, [[1, 2], [3, 5]])
    np.testing.assert_array_equal(Dk, np.array([[1.0, 2.0], [0.5, 0.7]], np.float32))


def test_percentile_error_is_the_dkw_bound():
    assert streams.percentile_error(None) == 0.0
    assert streams.percentile_error(20_000) == pytest.approx(
        100 * math.sqrt(math.log(2 / 0.05) / 40_000))
    assert streams.percentile_error(100) > streams.percentile_error(10_000)
