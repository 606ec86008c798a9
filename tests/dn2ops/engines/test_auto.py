"""--engine auto and make_handler: the engine is chosen where the model loads, and its
features equal torch's."""

from __future__ import annotations

import numpy as np
import pytest

import dn2ops.engines.auto
from dn2ops.config import EmbedConfig
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.auto import AutoModelHandler, make_handler
from dn2ops.engines.onnxruntime import OnnxBackboneModelHandler
from dn2ops.engines.openvino import OpenVinoModelHandler
from dn2ops.engines.torch import TorchModelHandler

BACKBONE = "efficientnet_lite0"


def _plan(engine: str) -> EmbedPlan:
    return EmbedPlan(EmbedConfig(backbone=BACKBONE, engine=engine, device="cpu",
                                 batch_size=4), get_spec(BACKBONE), weights_sha256="")


def test_auto_features_equal_torch_features_on_real_images(features, real_batch,
                                                           torch_features):
    got = features("auto", real_batch)
    scale = np.abs(torch_features).max()
    assert got.shape == torch_features.shape == (8, 1280) and got.dtype == np.float32
    assert scale > 1.0  # real features, not zeros
    assert np.abs(got - torch_features).max() <= 1e-4 * scale


@pytest.mark.parametrize("engine, handler", [
    ("auto", AutoModelHandler), ("torch", TorchModelHandler),
    ("onnxruntime", OnnxBackboneModelHandler), ("openvino", OpenVinoModelHandler)])
def test_each_engine_has_its_handler_built_from_the_plan(engine, handler):
    plan = _plan(engine)
    built = make_handler(plan)
    assert type(built) is handler and built.plan is plan
    assert built.batch_elements_kwargs() == {"min_batch_size": 4, "max_batch_size": 4}


def test_an_unknown_engine_has_no_handler():
    with pytest.raises(ValueError, match="engine must be one of"):
        make_handler(_plan("tensorrt"))


def test_auto_chooses_the_engine_when_the_model_loads(monkeypatch, real_batch,
                                                      torch_features):
    """Not when the handler is built (on the launcher): in load_model, on the worker."""
    handler = make_handler(EmbedPlan.resolve(EmbedConfig(
        backbone=BACKBONE, engine="auto", device="cpu", batch_size=len(real_batch))))
    asked = []
    monkeypatch.setattr(dn2ops.engines.auto, "resolve_engine",
                        lambda engine, device: asked.append((engine, device)) or "torch")
    model = handler.load_model()
    assert asked == [("auto", "cpu")] and type(model.handler) is TorchModelHandler
    got = np.stack([r.inference for r in handler.run_inference(list(real_batch), model)])
    np.testing.assert_array_equal(got, torch_features)
