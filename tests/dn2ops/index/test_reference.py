"""dn2ops.index.reference: the percentile reference's scores and distances, against
brute-force numpy leave-one-out."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dn2ops.index.knn import knn
from dn2ops.index.reference import (
    approx_loo,
    distances_column,
    flat_loo,
    nearest_centre,
    reference_scores,
)
from dn2ops.index.shards import shard_loader, write_flat_shards
from dn2ops.io import outputs
from tests.conftest import brute_dists, clustered

X = clustered(150, seed=8)


def _loo_by_hand(k: int) -> np.ndarray:
    """Each row's k smallest distances to the other rows (150, k), float64."""
    R = brute_dists(X, X)
    np.fill_diagonal(R, np.inf)
    return np.sort(R, axis=1)[:, :k]


def _chunks():
    return iter([X[:70], X[70:]])


def test_flat_leave_one_out_over_every_row(tmp_path):
    fs, path = outputs.fs_and_path(str(tmp_path))
    names = sorted(write_flat_shards(fs, path, _chunks(), [50, 100]))
    score = flat_loo(shard_loader(fs, path, names, "cpu"), 2, "cpu")
    ref, D = reference_scores(score, _chunks, len(X), None, keep=2)
    np.testing.assert_allclose(D, _loo_by_hand(2), rtol=1e-5)
    np.testing.assert_allclose(ref, _loo_by_hand(2).mean(axis=1), rtol=1e-5)
    assert ref.dtype == np.float64 and D.dtype == np.float32


def test_a_sample_is_scored_and_the_rest_is_nan():
    ids = np.array([0, 3, 71, 149])
    exact = approx_loo(lambda index, xq, k: knn(xq, X, k), None, 3)  # an exact "index"
    ref = reference_scores(exact, _chunks, len(X), ids)
    np.testing.assert_allclose(ref[ids], _loo_by_hand(3).mean(axis=1)[ids], rtol=1e-5)
    assert np.isnan(np.delete(ref, ids)).all()


def test_nearest_centre_is_the_distance_to_the_closest_centre():
    centres = X[[5, 60, 120]] + 0.5
    ref, D = reference_scores(nearest_centre(centres), _chunks, len(X), None, keep=1)
    np.testing.assert_allclose(ref, brute_dists(X, centres).min(axis=1), rtol=1e-5)
    assert D.shape == (len(X), 1)


def test_distances_column_nulls_unsampled_rows():
    D = np.array([[1.0, 2.0], [np.nan, np.nan], [0.5, 0.25]], np.float32)
    col = distances_column(D)
    assert col.type == pa.list_(pa.float32())
    assert col.to_pylist() == [[1.0, 2.0], None, [0.5, 0.25]]
