"""--engine onnxruntime: features equal torch's on real images, whatever the batch and
the threads, for dn2's default composite backbone too."""

from __future__ import annotations

import numpy as np

from dn2ops.config import DEFAULT_BACKBONE
from dn2ops.engines.onnxruntime import session_options


def test_features_equal_torch_features_on_real_images(features, real_batch, torch_features):
    got = features("onnxruntime", real_batch)
    scale = np.abs(torch_features).max()
    assert got.shape == torch_features.shape == (8, 1280) and got.dtype == np.float32
    assert scale > 1.0  # real features, not zeros
    assert np.abs(got - torch_features).max() <= 1e-4 * scale


def test_features_do_not_depend_on_the_batch_or_threads(features, real_batch):
    whole = features("onnxruntime", real_batch, threads=2)
    single = np.concatenate([features("onnxruntime", real_batch[i:i + 1], threads=1)
                             for i in (0, 5)])
    np.testing.assert_allclose(single, whole[[0, 5]], rtol=1e-5, atol=1e-5)


def test_a_model_call_runs_in_engine_batches_with_the_same_features(features, real_batch):
    """--engine-batch 3 runs a call of 8 images as 3 + 3 + 2: the working memory of 3."""
    whole = features("onnxruntime", real_batch)
    sliced = features("onnxruntime", real_batch, engine_batch=3)
    np.testing.assert_allclose(sliced, whole, rtol=1e-5, atol=1e-5)


def test_default_composite_backbone_runs_alike(features, composite_batch,
                                               composite_torch_features):
    """dn2's default backbone (two networks in one exported graph) equals its torch
    features on real images at its own 274 -> 240 crop."""
    want = composite_torch_features
    got = features("onnxruntime", composite_batch, DEFAULT_BACKBONE)
    assert composite_batch.shape[1:] == (3, 240, 240) and got.shape == (2, 2560)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_session_threads_sleep_between_model_calls():
    options = session_options(3)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
