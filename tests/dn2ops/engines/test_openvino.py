"""--engine openvino: features equal torch's on real images, whatever the batch and the
threads, for dn2's default composite backbone too."""

from __future__ import annotations

import numpy as np
import pytest

from dn2ops.config import DEFAULT_BACKBONE
from dn2ops.engines.openvino import compile_config

pytest.importorskip("openvino", reason="--engine openvino needs pip install 'dn2[openvino]'")


def test_features_equal_torch_features_on_real_images(features, real_batch, torch_features):
    got = features("openvino", real_batch)
    scale = np.abs(torch_features).max()
    assert got.shape == torch_features.shape == (8, 1280) and got.dtype == np.float32
    assert scale > 1.0  # real features, not zeros
    assert np.abs(got - torch_features).max() <= 1e-4 * scale


def test_features_do_not_depend_on_the_batch_or_threads(features, real_batch):
    whole = features("openvino", real_batch, threads=2)
    single = np.concatenate([features("openvino", real_batch[i:i + 1], threads=1)
                             for i in (0, 5)])
    np.testing.assert_allclose(single, whole[[0, 5]], rtol=1e-5, atol=1e-5)


def test_default_composite_backbone_runs_alike(features, composite_batch,
                                               composite_torch_features):
    """dn2's default backbone (two networks in one exported graph) equals its torch
    features on real images at its own 274 -> 240 crop."""
    want = composite_torch_features
    got = features("openvino", composite_batch, DEFAULT_BACKBONE)
    assert composite_batch.shape[1:] == (3, 240, 240) and got.shape == (2, 2560)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_compiles_in_float32_on_the_threads_asked_for():
    """float32, not the CPU's bfloat16 default, so that features equal torch's."""
    config = compile_config(4)
    assert config["INFERENCE_PRECISION_HINT"] == "f32" and config["INFERENCE_NUM_THREADS"] == 4
