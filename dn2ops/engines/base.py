"""Inference engines: which runtime runs the backbone, on which device, with how many
threads; and Dn2ModelHandler, the base of dn2's Beam model handlers.

As in Beam's ``ml/inference``, the shared core is here and each runtime has its own
module: ``--engine torch`` runs the torch module (dn2ops.engines.torch, CPU or CUDA);
``onnxruntime`` and ``openvino`` run the same backbone exported to ONNX
(dn2ops.embed.export) on the CPU (dn2ops.engines.onnxruntime, dn2ops.engines.openvino:
dn2's own handlers, not Beam's ONNX handler, whose ``onnx`` import slows every worker's
start). Their features are interchangeable: the exported graph computes the same
function in float32 (max |difference| ~1e-5 of features of scale ~5, tested in
tests/dn2ops/engines/test_onnxruntime.py and test_openvino.py), so an index accepts
features from any engine.

``auto`` (dn2ops.engines.auto) is resolved where the model loads (a Dataflow worker may
have a GPU that the launching machine lacks): torch on a CUDA GPU, else the fastest CPU
engine measured on this project's machine at dn2's batch sizes
(benchmarks/embed_speed.py: ONNX Runtime, ahead of OpenVINO at batch 16 and 64 for
Lite0 and ResNet-50, both far ahead of torch on the CPU), else torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from apache_beam.ml.inference.base import ExampleT, ModelHandler, ModelT, PredictionT

from dn2ops.config import CPU_ENGINE_BATCH, EmbedConfig
from dn2ops.embed.plan import EmbedPlan
from dn2ops.errors import UserError

if TYPE_CHECKING:
    import torch

ENGINES = ("auto", "torch", "openvino", "onnxruntime")
DEVICES = ("auto", "cpu", "cuda")
# --engine auto on a CPU: the first installed of these (see the module docstring).
AUTO_CPU_ORDER = ("onnxruntime", "openvino")
_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


class DeviceError(UserError, RuntimeError):
    """A device was asked for that this machine does not have."""


class EngineError(UserError, RuntimeError):
    """An engine was asked for that cannot run here (not installed, or not on this device)."""


# Where an NVIDIA driver shows itself on Linux (natively, in a container given a GPU, and
# WSL's /dev/dxg): without any of them torch cannot see a CUDA GPU either.
_NVIDIA_PATHS = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg")


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU, asked without importing torch on a Linux machine
    that has no NVIDIA driver: a CPU-engine worker never imports torch (0.5 GB of RSS a
    process, docs/memory.md)."""
    if sys.platform.startswith("linux") and not any(map(os.path.exists, _NVIDIA_PATHS)):
        return False
    import torch

    return torch.cuda.is_available()


def device_type(device: str = "auto") -> str:
    """'auto' -> 'cuda' when present else 'cpu'; 'cuda' without a GPU fails fast."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    has_cuda = cuda_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device == "cuda" and not has_cuda:
        raise DeviceError("--device cuda was asked for but torch sees no CUDA GPU "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")
    return device


def resolve_device(device: str = "auto") -> torch.device:
    """device_type(device) as a torch.device (for the torch engine)."""
    import torch

    return torch.device(device_type(device))


def installed(engine: str) -> bool:
    package = _PACKAGES.get(engine)
    return package is None or importlib.util.find_spec(package) is not None


def resolve_engine(engine: str = "auto", device: str = "auto") -> str:
    """The engine that runs on this machine: 'auto' resolved, the others checked.

    Raises EngineError for an engine not installed, or a CPU-only engine with
    ``device='cuda'``; DeviceError for 'cuda' without a GPU.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    on_cuda = device_type(device) == "cuda"
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


def thread_plan(plan: EmbedPlan) -> tuple[int, int]:
    """(engine threads, decode threads) of one model call, from this machine's cores.

    A model call's share of the cores is cores // ``plan.workers`` (1 with one SDK
    process per core, as Dataflow runs Python). Decoding runs on the whole share, and so
    does a CPU engine: the two take turns rather than compete, since the engine's threads
    sleep between model calls (onnxruntime.session_options) and PIL releases the GIL
    while it decodes, so decoding fills the cores while the engine waits for a batch.
    A split share idled cores: with 1 + 1 on 2 cores ONNX Runtime ran on one core, and
    a single decode thread capped 12 MP JPEGs at ~44 images/s (README, Threads).
    When torch runs the model on a GPU, the engine keeps 1 thread for its host-side
    work. Explicit ``threads`` / ``decode_threads`` (plan.config) replace either part.
    """
    config, workers = plan.config, plan.workers
    share = 1 if workers is None else max(1, usable_cores() // max(1, workers))
    # A model shared by the machine's processes (dn2ops.engines.shared) runs one call at a
    # time for all of them: on every core.
    engine = usable_cores() if plan.shared else share
    threads = config.threads or (1 if on_gpu(config) else engine)
    return threads, config.decode_threads or share


def shares_model(config: EmbedConfig, processes: int | None) -> bool:
    """Whether the SDK processes of a machine share one model (dn2ops.engines.shared):
    ``config.share_model`` 'on' / 'off', or 'auto': when more than one process runs the
    model on a machine (``processes``: the local runner's processes, 1 for threads; None:
    one a vCPU, as Dataflow runs Python) on a CPU engine. A GPU's torch model is not
    shared by 'auto' (dn2's GPU workers run one SDK process: deploy/); neither is an
    engine that the launcher cannot tell (``--device auto``, ``--engine auto``, on a
    remote runner, whose workers may have a GPU)."""
    if config.share_model != "auto":
        return config.share_model == "on"
    if (processes is not None and processes <= 1) or config.device == "cuda":
        return False
    if config.engine in ("onnxruntime", "openvino") or config.device == "cpu":
        return True
    return processes is not None and resolve_engine(config.engine, config.device) != "torch"


def on_gpu(config: EmbedConfig) -> bool:
    """Whether this machine runs ``config``'s model on a GPU (torch on CUDA)."""
    return (resolve_engine(config.engine, config.device) == "torch"
            and device_type(config.device) == "cuda")


def engine_batch(config: EmbedConfig, gpu: bool) -> int:
    """Images the engine runs at once: ``config.engine_batch``, else the whole model call
    on a GPU and CPU_ENGINE_BATCH on a CPU (dn2ops.config), never more than a call."""
    return min(config.engine_batch or (config.batch_size if gpu else CPU_ENGINE_BATCH),
               config.batch_size)


def in_slices(run: Callable[[np.ndarray], np.ndarray], batch: Sequence[np.ndarray],
              size: int) -> np.ndarray:
    """``run`` over ``batch`` stacked ``size`` images at a time, outputs concatenated:
    the engine's working memory is that of ``size`` images, whatever the call's batch."""
    return np.concatenate([run(np.stack(batch[i:i + size]))
                           for i in range(0, len(batch), size)])


class Dn2ModelHandler(ModelHandler[ExampleT, PredictionT, ModelT]):
    """What every dn2 model handler shares (the engines', and the index's in
    dn2ops.score.images): its batch sizes, its batches' size in bytes, its metrics.

    Batches hold ``batch_size`` elements (fewer at the end of a bundle), and at least
    ``min_batch_size`` (None: ``batch_size``, so that an engine runs the batch size
    asked for). A batch's bytes are its elements' ``nbytes`` (numpy arrays, Arrow record
    batches): Beam's default pickles the whole batch to measure it.
    """

    metrics_namespace = "dn2"  # RunInference's counters: dn2 (embedding), dn2_score

    def __init__(self, *, batch_size: int, min_batch_size: int | None = None):
        super().__init__(min_batch_size=batch_size if min_batch_size is None else min_batch_size,
                         max_batch_size=batch_size)

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return self.metrics_namespace
