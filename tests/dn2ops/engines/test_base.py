"""Engines: every engine's features equal torch's on real images; choice and threads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import dn2ops.engines.base
from benchmarks.datasets import phone_photo
from dn2ops.config import DEFAULT_BACKBONE
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.stage import prepare
from dn2ops.engines.base import (
    EngineConfig,
    EngineError,
    installed,
    make_handler,
    resolve_engine,
    thread_plan,
)
from dn2ops.engines.torch import DeviceError
from tests.conftest import digit_images

BACKBONE = "efficientnet_lite0"
CPU_ENGINES = [e for e in ("openvino", "onnxruntime") if installed(e)]


@pytest.fixture(scope="module")
def real_batch(tmp_path_factory) -> np.ndarray:
    """uint8 (8, 3, 224, 224) as PrepareImages makes it: 4 photographs (JPEG, one
    portrait by EXIF) and 4 handwritten digits (PNG), all scikit-learn's."""
    root = tmp_path_factory.mktemp("real")
    paths = []
    for i in range(4):
        exif = Image.Exif()
        exif[0x0112] = 6 if i == 3 else 1
        path = root / f"photo{i}.jpg"
        phone_photo(i, size=(1024, 768)).save(path, "JPEG", quality=90, exif=exif.tobytes())
        paths.append(path)
    _, digits, _ = digit_images(n_incoming=4)
    for i, digit in enumerate(digits):
        buf = io.BytesIO()
        Image.fromarray(digit).save(buf, "PNG")
        (root / f"digit{i}.png").write_bytes(buf.getvalue())
        paths.append(root / f"digit{i}.png")
    pre = get_spec(BACKBONE).preprocessing
    return np.stack([prepare({"uri": str(p)}, pre)[1] for p in paths])


def _features(engine: str, batch: np.ndarray, **config) -> np.ndarray:
    handler = make_handler(EngineConfig(backbone=BACKBONE, engine=engine, device="cpu",
                                        batch_size=len(batch), **config))
    model = handler.load_model()
    return np.stack([r.inference for r in handler.run_inference(list(batch), model)])


@pytest.fixture(scope="module")
def torch_features(real_batch) -> np.ndarray:
    return _features("torch", real_batch)


@pytest.mark.parametrize("engine", [*CPU_ENGINES, "auto"])
def test_engine_features_equal_torch_features_on_real_images(engine, real_batch,
                                                             torch_features):
    got = _features(engine, real_batch)
    scale = np.abs(torch_features).max()
    assert got.shape == torch_features.shape == (8, 1280) and got.dtype == np.float32
    assert scale > 1.0  # real features, not zeros
    assert np.abs(got - torch_features).max() <= 1e-4 * scale


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_features_do_not_depend_on_the_batch_or_threads(engine, real_batch):
    whole = _features(engine, real_batch, threads=2)
    single = np.concatenate([_features(engine, real_batch[i:i + 1], threads=1)
                             for i in (0, 5)])
    np.testing.assert_allclose(single, whole[[0, 5]], rtol=1e-5, atol=1e-5)


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
    monkeypatch.setattr(dn2ops.engines.base, "resolve_device", lambda d: torch.device("cuda"))
    assert resolve_engine("auto", "auto") == "torch"


def test_engines_that_cannot_run_here_fail_with_a_reason(monkeypatch):
    with pytest.raises(EngineError, match="runs on the CPU; with --device cuda"):
        monkeypatch.setattr(dn2ops.engines.base, "resolve_device", lambda d: torch.device("cuda"))
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
    monkeypatch.setattr(dn2ops.engines.base, "resolve_device", lambda d: torch.device("cpu"))
    threads, decode = thread_plan(EngineConfig(backbone=BACKBONE, engine="torch", **config))
    assert (threads, decode) == expected
    workers = config.get("workers", 1)
    share = 1 if workers is None else max(1, cores // workers)
    if "threads" not in config and "decode_threads" not in config:
        # never more threads of either kind than the cores a model call may use
        assert threads == decode == share


def test_with_a_gpu_every_core_of_the_share_decodes(monkeypatch):
    monkeypatch.setattr(dn2ops.engines.base, "usable_cores", lambda: 8)
    monkeypatch.setattr(dn2ops.engines.base, "resolve_device", lambda d: torch.device("cuda"))
    assert thread_plan(EngineConfig(backbone=BACKBONE, engine="auto")) == (1, 8)
    # openvino on a GPU machine still runs on the CPU: on every core, beside decoding
    monkeypatch.setattr(dn2ops.engines.base, "installed", lambda e: True)
    assert thread_plan(EngineConfig(backbone=BACKBONE, engine="openvino")) == (8, 8)


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_default_composite_backbone_runs_alike_on_every_engine(engine, tmp_path):
    """dn2's default backbone (two networks in one exported graph) equals its torch
    features on each CPU engine, on real images at its own 274 -> 240 crop."""
    from sklearn.datasets import load_sample_images

    spec = get_spec(DEFAULT_BACKBONE)
    for i, image in enumerate(load_sample_images().images):
        Image.fromarray(image).save(tmp_path / f"{i}.jpg", "JPEG", quality=90)
    batch = np.stack([prepare({"uri": str(p)}, spec.preprocessing)[1]
                      for p in sorted(tmp_path.glob("*.jpg"))])

    def features(e: str) -> np.ndarray:
        handler = make_handler(EngineConfig(backbone=DEFAULT_BACKBONE, engine=e,
                                            device="cpu", batch_size=len(batch)))
        model = handler.load_model()
        return np.stack([r.inference for r in handler.run_inference(list(batch), model)])

    want, got = features("torch"), features(engine)
    assert batch.shape[1:] == (3, 240, 240) and got.shape == (2, 2560)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
