"""The two plots are real PNGs of the documented size."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from dn2ops.report.plots import histogram_png, roc_png


def _png(data_uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_uri.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(data_uri[len(prefix):])))
    image.load()
    assert image.format == "PNG"
    return image


@pytest.mark.parametrize("normal", [None, np.array([]), np.linspace(0.5, 1.5, 200)])
def test_histogram(normal):
    scores = np.random.default_rng(0).gamma(4.0, 0.25, 300)
    image = _png(histogram_png(scores, normal))
    assert image.size == (800, 360)
    # drawn, not blank: the partition's red outline is there
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert ((pixels[:, 0] > 180) & (pixels[:, 1] < 80) & (pixels[:, 2] < 80)).sum() > 100


def test_roc():
    image = _png(roc_png(np.array([0.0, 0.2, 1.0]), np.array([0.0, 0.9, 1.0]), 0.85))
    assert image.size == (420, 420)
