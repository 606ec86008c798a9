"""Shared by the engines' tests: real images as PrepareImages makes them, each engine's
features of them, and torch's, the reference every engine is held to."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from benchmarks.datasets import phone_photo
from dn2ops.config import DEFAULT_BACKBONE, EmbedConfig
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.plan import EmbedPlan
from dn2ops.embed.stage import prepare
from dn2ops.engines.auto import make_handler
from tests.conftest import digit_images

BACKBONE = "efficientnet_lite0"


def engine_features(engine: str, batch: np.ndarray, backbone: str = BACKBONE,
                    **config) -> np.ndarray:
    """uint8 (N, 3, crop, crop) -> features (N, dim) through ``engine``'s model handler."""
    plan = EmbedPlan.resolve(EmbedConfig(backbone=backbone, engine=engine, device="cpu",
                                         batch_size=len(batch), **config))
    handler = make_handler(plan)
    model = handler.load_model()
    return np.stack([r.inference for r in handler.run_inference(list(batch), model)])


@pytest.fixture(scope="package")
def features() -> Callable[..., np.ndarray]:
    return engine_features


@pytest.fixture(scope="package")
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


@pytest.fixture(scope="package")
def torch_features(real_batch) -> np.ndarray:
    return engine_features("torch", real_batch)


@pytest.fixture(scope="package")
def composite_batch(tmp_path_factory) -> np.ndarray:
    """scikit-learn's two sample photographs at dn2's default backbone's own crop."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("composite")
    for i, image in enumerate(load_sample_images().images):
        Image.fromarray(image).save(root / f"{i}.jpg", "JPEG", quality=90)
    spec = get_spec(DEFAULT_BACKBONE)
    return np.stack([prepare({"uri": str(p)}, spec.preprocessing)[1]
                     for p in sorted(root.glob("*.jpg"))])


@pytest.fixture(scope="package")
def composite_torch_features(composite_batch) -> np.ndarray:
    return engine_features("torch", composite_batch, DEFAULT_BACKBONE)
