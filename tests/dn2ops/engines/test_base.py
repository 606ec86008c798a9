"""The engines' shared core: devices and engines resolved or refused, the thread plan,
and the base model handler."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

import dn2ops.engines.base
from dn2ops.config import EmbedConfig
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.base import (
    DeviceError,
    Dn2ModelHandler,
    EngineError,
    cuda_available,
    engine_batch,
    in_slices,
    resolve_device,
    resolve_engine,
    thread_plan,
)
from dn2ops.errors import UserError

BACKBONE = "efficientnet_lite0"


def _plan(workers: int | None = 1, **config) -> EmbedPlan:
    """A plan without loading any weights (the thread plan does not need them)."""
    return EmbedPlan(EmbedConfig(backbone=BACKBONE, **config), get_spec(BACKBONE),
                     weights_sha256="", workers=workers)


def test_auto_device_is_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto").type == "cpu"


def test_asking_for_cuda_without_one_fails_fast():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_cuda_available_agrees_with_torch():
    assert cuda_available() == torch.cuda.is_available()


def test_without_an_nvidia_driver_cuda_is_not_asked_of_torch(monkeypatch):
    # No driver path on a Linux machine: the answer comes without torch (whose import a
    # CPU-engine worker would pay for); with one, torch is asked.
    monkeypatch.setattr(dn2ops.engines.base.sys, "platform", "linux")
    monkeypatch.setattr(dn2ops.engines.base, "_NVIDIA_PATHS", ("/nonexistent/nvidiactl",))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_available() is False
    monkeypatch.setattr(dn2ops.engines.base, "_NVIDIA_PATHS", ("/proc/self",))
    assert cuda_available() is True


@pytest.mark.parametrize(("config", "gpu", "expected"), [
    ({}, False, 8),  # dn2ops.config.CPU_ENGINE_BATCH
    ({}, True, 64),  # a GPU runs the whole model call
    ({"engine_batch": 16}, False, 16),
    ({"engine_batch": 8}, True, 8),
    ({"batch_size": 4}, False, 4),  # never more than a call holds
    ({"batch_size": 32, "engine_batch": 100}, True, 32),
])
def test_engine_batch(config, gpu, expected):
    assert engine_batch(EmbedConfig(**config), gpu) == expected


def test_in_slices_runs_the_engine_on_slices_and_concatenates_in_order():
    batch = [np.full((3, 2, 2), i, np.uint8) for i in range(7)]
    seen = []

    def run(x):
        seen.append(len(x))
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True).astype(np.float32)

    out = in_slices(run, batch, 3)
    assert seen == [3, 3, 1]
    np.testing.assert_array_equal(out[:, 0], [12 * i for i in range(7)])


def test_unknown_device():
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")


def test_device_and_engine_errors_are_the_users():
    for error in (DeviceError, EngineError):
        assert issubclass(error, UserError) and issubclass(error, RuntimeError)


def test_auto_is_onnxruntime_on_a_cpu_then_openvino_then_torch(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    have = {"openvino": True, "onnxruntime": True}
    monkeypatch.setattr(dn2ops.engines.base, "installed", lambda e: have.get(e, True))
    assert resolve_engine("auto", "cpu") == resolve_engine("auto", "auto") == "onnxruntime"
    have["onnxruntime"] = False
    assert resolve_engine("auto", "cpu") == "openvino"
    have["openvino"] = False
    assert resolve_engine("auto", "cpu") == "torch"


def test_auto_is_torch_on_a_gpu(monkeypatch):
    monkeypatch.setattr(dn2ops.engines.base, "cuda_available", lambda: True)
    assert resolve_engine("auto", "auto") == "torch"


def test_engines_that_cannot_run_here_fail_with_a_reason(monkeypatch):
    with pytest.raises(EngineError, match="runs on the CPU; with --device cuda"):
        monkeypatch.setattr(dn2ops.engines.base, "cuda_available", lambda: True)
        resolve_engine("openvino", "cuda")
    monkeypatch.undo()
    monkeypatch.setattr(dn2ops.engines.base, "installed", lambda e: e == "torch")
    with pytest.raises(EngineError, match=r"pip install 'dn2\[openvino\]'"):
        resolve_engine("openvino", "cpu")
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("tensorrt", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            resolve_engine("torch", "cuda")


@pytest.mark.parametrize(
    ("cores", "config", "expected"),
    [
        (2, {}, (2, 2)),  # this project's machine: engine and decoding on both cores
        (1, {}, (1, 1)),
        (3, {}, (3, 3)),
        (8, {"workers": 2}, (4, 4)),  # two model calls at once share the 8 cores
        (8, {"workers": None}, (1, 1)),  # one SDK process per core (Dataflow)
        (2, {"workers": 4}, (1, 1)),  # more workers than cores: still one thread each
        (8, {"threads": 6}, (6, 8)),
        (8, {"decode_threads": 2}, (8, 2)),
    ],
)
def test_thread_plan_gives_the_engine_and_decoding_the_share_of_the_cores(
        monkeypatch, cores, config, expected):
    monkeypatch.setattr(dn2ops.engines.base, "usable_cores", lambda: cores)
    monkeypatch.setattr(dn2ops.engines.base, "cuda_available", lambda: False)
    threads, decode = thread_plan(_plan(engine="torch", **config))
    assert (threads, decode) == expected
    workers = config.get("workers", 1)
    share = 1 if workers is None else max(1, cores // workers)
    if "threads" not in config and "decode_threads" not in config:
        # never more threads of either kind than the cores a model call may use
        assert threads == decode == share


def test_with_a_gpu_every_core_of_the_share_decodes(monkeypatch):
    monkeypatch.setattr(dn2ops.engines.base, "usable_cores", lambda: 8)
    monkeypatch.setattr(dn2ops.engines.base, "cuda_available", lambda: True)
    assert thread_plan(_plan(engine="auto")) == (1, 8)
    # openvino on a GPU machine still runs on the CPU: on every core, beside decoding
    monkeypatch.setattr(dn2ops.engines.base, "installed", lambda e: True)
    assert thread_plan(_plan(engine="openvino")) == (8, 8)


class _Handler(Dn2ModelHandler):
    def load_model(self):
        return None

    def run_inference(self, batch, model, inference_args=None):
        return batch


def test_base_handler_batches_measures_bytes_and_names_its_metrics():
    images = [np.zeros((3, 8, 8), np.uint8), np.zeros((3, 8, 8), np.uint8)]
    rows = pa.RecordBatch.from_pydict({"x": np.arange(10, dtype=np.float64)})
    fixed, ranged = _Handler(batch_size=16), _Handler(batch_size=16, min_batch_size=1)
    assert fixed.batch_elements_kwargs() == {"min_batch_size": 16, "max_batch_size": 16}
    assert ranged.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 16}
    assert fixed.get_num_bytes(images) == 2 * 3 * 8 * 8
    assert fixed.get_num_bytes([rows, rows]) == 2 * rows.nbytes >= 2 * 10 * 8
    assert fixed.get_metrics_namespace() == "dn2"
