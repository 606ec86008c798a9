"""Inference engines: which runtime runs the backbone, and with how many threads.

``--engine torch`` runs the torch module (dn2ops.engines.torch.Embedder, CPU or CUDA);
``onnxruntime`` and ``openvino`` run the same backbone exported to ONNX
(dn2ops.embed.export) on the CPU. Each is a Beam ``ModelHandler``:
``embed_images.TorchModelHandler``, ``onnx_engine.OnnxBackboneModelHandler`` and
``openvino_engine.OpenVinoModelHandler`` (dn2's own, not Beam's ONNX handler, whose
``onnx`` import slows every worker's start: see dn2ops.engines.onnxruntime).
Their features are interchangeable: the exported graph computes the same
function in float32 (max |difference| ~1e-5 of features of scale ~5, tested in
tests/dn2ops/test_engines.py), so an index accepts features from any engine.

``auto`` is resolved where the model loads (a Dataflow worker may have a GPU
that the launching machine lacks): torch on a CUDA GPU, else the fastest CPU
engine measured on this project's machine at dn2's batch sizes
(benchmarks/embed_speed.py: ONNX Runtime, ahead of OpenVINO at batch 16 and 64 for
Lite0 and ResNet-50, both far ahead of torch on the CPU), else torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from dn2ops.engines.torch import resolve_device

ENGINES = ("auto", "torch", "openvino", "onnxruntime")
# --engine auto on a CPU: the first installed of these (see the module docstring).
AUTO_CPU_ORDER = ("onnxruntime", "openvino")
_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
LOG = logging.getLogger("dn2")


class EngineError(RuntimeError):
    """An engine was asked for that cannot run here (not installed, or not on this device)."""


def installed(engine: str) -> bool:
    package = _PACKAGES.get(engine)
    return package is None or importlib.util.find_spec(package) is not None


def resolve_engine(engine: str = "auto", device: str = "auto") -> str:
    """The engine that runs on this machine: 'auto' resolved, the others checked.

    Raises EngineError for an engine not installed, or a CPU-only engine with
    ``device='cuda'``; DeviceError (dn2ops.engines.torch) for 'cuda' without a GPU.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    on_cuda = resolve_device(device).type == "cuda"
    if engine == "auto":
        if on_cuda:
            return "torch"
        return next((e for e in AUTO_CPU_ORDER if installed(e)), "torch")
    if engine != "torch" and device == "cuda":
        raise EngineError(f"--engine {engine} runs on the CPU; with --device cuda use "
                          "--engine torch (or auto)")
    if not installed(engine):
        extra = "openvino" if engine == "openvino" else ""
        raise EngineError(f"--engine {engine} needs the {_PACKAGES[engine]} package: pip "
                          f"install {repr(f'dn2[{extra}]') if extra else _PACKAGES[engine]}")
    return engine


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What every engine's handler is built from (picklable: it travels to the workers).

    ``threads`` / ``decode_threads``: the engine's threads per model call / images
    decoded at once beside it (None: see thread_plan); ``workers``: model calls that
    run at once on one machine (None: one process per core, as Dataflow runs Python);
    ``cache_dir``: where exports are kept (None: the default of dn2ops.embed.export).
    """

    backbone: str
    engine: str = "auto"
    weights: str | None = None
    device: str = "auto"
    batch_size: int = 64
    threads: int | None = None
    decode_threads: int | None = None
    workers: int | None = 1
    cache_dir: str | None = None


def thread_plan(config: EngineConfig) -> tuple[int, int]:
    """(engine threads, decode threads) of one model call, from this machine's cores.

    A model call's share of the cores is cores // ``workers`` (1 with one SDK process
    per core, as Dataflow runs Python). Decoding runs on the whole share, and so does a
    CPU engine: the two take turns rather than compete, since the engine's threads
    sleep between model calls (onnx_engine.session_options) and PIL releases the GIL
    while it decodes, so decoding fills the cores while the engine waits for a batch.
    A split share idled cores: with 1 + 1 on 2 cores ONNX Runtime ran on one core, and
    a single decode thread capped 12 MP JPEGs at ~44 images/s (README, Threads).
    When torch runs the model on a GPU, the engine keeps 1 thread for its host-side
    work. Explicit ``threads`` / ``decode_threads`` replace either part.
    """
    share = 1 if config.workers is None else max(1, usable_cores() // max(1, config.workers))
    gpu = (resolve_engine(config.engine, config.device) == "torch"
           and resolve_device(config.device).type == "cuda")
    threads = config.threads or (1 if gpu else share)
    return threads, config.decode_threads or share


def make_handler(config: EngineConfig) -> ModelHandler:
    """The Beam model handler of ``config.engine`` (``auto``: resolved when the model loads)."""
    engine = config.engine
    if engine == "auto":
        return AutoModelHandler(config)
    if engine == "torch":
        from dn2ops.embed.stage import TorchModelHandler

        return TorchModelHandler(config)
    if engine == "onnxruntime":
        from dn2ops.engines.onnxruntime import OnnxBackboneModelHandler

        return OnnxBackboneModelHandler(config)
    if engine == "openvino":
        from dn2ops.engines.openvino import OpenVinoModelHandler

        return OpenVinoModelHandler(config)
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


@dataclasses.dataclass
class _Chosen:
    handler: ModelHandler
    model: Any


class AutoModelHandler(ModelHandler[np.ndarray, PredictionResult, _Chosen]):
    """``--engine auto``: the engine is chosen in ``load_model()``, on the machine that
    runs it, and every call is handed to that engine's handler."""

    def __init__(self, config: EngineConfig):
        super().__init__(min_batch_size=config.batch_size, max_batch_size=config.batch_size)
        self.config = config

    def load_model(self) -> _Chosen:
        engine = resolve_engine("auto", self.config.device)
        handler = make_handler(dataclasses.replace(self.config, engine=engine))
        return _Chosen(handler, handler.load_model())

    def run_inference(self, batch: Sequence[np.ndarray], model: _Chosen,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[PredictionResult]:
        return model.handler.run_inference(batch, model.model, inference_args)

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return "dn2"
