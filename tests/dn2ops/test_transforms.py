"""Feature transforms, checked against hand-computed values."""

import numpy as np
import pytest

from dn2ops.transforms import apply


def test_none_is_the_identity():
    x = np.array([[3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(apply(x, "none"), x)


def test_l2_scales_rows_to_unit_length_and_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(apply(x, "l2"), [[0.6, 0.8], [0.0, 0.0]])


def test_sqrt_l2_takes_signed_square_roots_first():
    x = np.array([[9.0, -16.0]], np.float32)  # -> [3, -4] -> [0.6, -0.8]
    np.testing.assert_allclose(apply(x, "sqrt-l2"), [[0.6, -0.8]], rtol=1e-6)


def test_root4_l2_takes_signed_fourth_roots_first():
    x = np.array([[81.0, -256.0, 0.0]], np.float32)  # -> [3, -4, 0] -> [0.6, -0.8, 0]
    np.testing.assert_allclose(apply(x, "root4-l2"), [[0.6, -0.8, 0.0]], rtol=1e-6)
    assert apply(x, "root4-l2").dtype == np.float32


def test_unknown_transform():
    with pytest.raises(ValueError, match="must be one of"):
        apply(np.zeros((1, 2)), "pca")
