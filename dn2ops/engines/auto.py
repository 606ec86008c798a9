"""``--engine auto``, and the handler of any ``--engine`` (make_handler).

``auto`` is resolved in ``load_model()``, once per worker process, on the machine that
runs the model (dn2ops.engines.base.resolve_engine: torch on a CUDA GPU, else ONNX
Runtime, else OpenVINO, else torch): a Dataflow worker may have a GPU that the
launching machine lacks. Every call then goes to that engine's handler.

Each engine's module is imported when its handler is made: a worker that runs ONNX
Runtime never imports torch or OpenVINO (torch alone is 0.5 GB of RSS a process).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.base import ENGINES, Dn2ModelHandler, resolve_engine

# engine -> (module, handler class)
HANDLERS: dict[str, tuple[str, str]] = {
    "torch": ("dn2ops.engines.torch", "TorchModelHandler"),
    "onnxruntime": ("dn2ops.engines.onnxruntime", "OnnxBackboneModelHandler"),
    "openvino": ("dn2ops.engines.openvino", "OpenVinoModelHandler")}


def handler_class(engine: str) -> type[Dn2ModelHandler]:
    """The model handler class of ``engine`` (not 'auto'), its module imported now."""
    if engine not in HANDLERS:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    module, name = HANDLERS[engine]
    return getattr(importlib.import_module(module), name)


def make_handler(plan: EmbedPlan) -> ModelHandler:
    """The Beam model handler of ``plan.config.engine`` (``auto``: resolved when the
    model loads), served once per machine when ``plan.shared`` (dn2ops.engines.shared)."""
    engine = plan.config.engine
    handler = AutoModelHandler(plan) if engine == "auto" else handler_class(engine)(plan)
    if plan.shared:
        from dn2ops.engines.shared import SharedModelHandler
        return SharedModelHandler(handler, plan.config.batch_size)
    return handler


@dataclasses.dataclass
class _Chosen:
    handler: ModelHandler
    model: Any


class AutoModelHandler(Dn2ModelHandler[np.ndarray, PredictionResult, _Chosen]):
    """uint8 batches (N, 3, crop, crop) -> pooled backbone features (dim,) float32, by
    the engine chosen in ``load_model()``."""

    def __init__(self, plan: EmbedPlan):
        super().__init__(batch_size=plan.config.batch_size)
        self.plan = plan

    def load_model(self) -> _Chosen:
        engine = resolve_engine("auto", self.plan.config.device)
        handler = handler_class(engine)(self.plan)
        return _Chosen(handler, handler.load_model())

    def run_inference(self, batch: Sequence[np.ndarray], model: _Chosen,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[PredictionResult]:
        return model.handler.run_inference(batch, model.model, inference_args)
