"""ONNX export: the exported graph computes the torch module; exports are cached by weights."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import dn2ops.embed.export
from dn2ops.embed.export import Normalized, export_onnx, weights_sha256
from dn2ops.embed.preprocess import Preprocessing

PRE = Preprocessing(resize=8, crop=8, mean=(0.5, 0.25, 0.125), std=(0.5, 0.5, 0.25))


def _tiny(scale: float = 1.0) -> nn.Module:
    """A one-layer 'backbone' with hand-set weights: conv 3 -> 2 channels, pooled."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]]).view(2, 3, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, scale]))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def test_normalized_is_the_preprocessing_normalisation_then_the_model():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    model = _tiny()
    with torch.no_grad():
        expected = model(PRE.normalize(x))
        got = Normalized(model, PRE)(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # by hand for channel 0 of image 0: mean of (x / 255 - 0.5) / 0.5
    by_hand = ((x[0, 0].double() / 255 - 0.5) / 0.5).mean()
    assert abs(float(got[0, 0]) - float(by_hand)) < 1e-5


def test_weights_sha256_changes_with_any_weight_and_only_with_weights():
    assert weights_sha256(_tiny()) == weights_sha256(_tiny())
    assert weights_sha256(_tiny()) != weights_sha256(_tiny(scale=2.0))
    # 0-d tensors (BatchNorm's num_batches_tracked) hash too
    assert len(weights_sha256(nn.BatchNorm2d(3))) == 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("exports"))
    return cache, export_onnx("tiny", _tiny(), PRE, cache)


def test_export_runs_like_the_module_at_any_batch_size(exported):
    ort = pytest.importorskip("onnxruntime")
    _, path = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    for n in (1, 5):
        x = np.random.default_rng(n).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
        with torch.no_grad():
            expected = Normalized(_tiny(), PRE)(torch.from_numpy(x)).numpy()
        got = session.run(None, {"images": x})[0]
        assert got.shape == (n, 2)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_export_is_cached_by_weights(exported, monkeypatch):
    cache, path = exported
    assert os.path.basename(path).startswith("tiny-") and path.endswith(".onnx")
    onnx.checker.check_model(path)
    mtime = os.path.getmtime(path)

    def no_export(*args):
        raise AssertionError("exported again although the cache holds these weights")

    monkeypatch.setattr(dn2ops.embed.export, "_export", no_export)
    assert export_onnx("tiny", _tiny(), PRE, cache) == path
    assert os.path.getmtime(path) == mtime
    with pytest.raises(AssertionError, match="exported again"):  # other weights: a new file
        export_onnx("tiny", _tiny(scale=3.0), PRE, cache)
    assert sorted(os.listdir(cache)) == [os.path.basename(path)]  # no temporary left behind
