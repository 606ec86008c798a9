"""Preprocessing: resize 256, center-crop 224, normalise, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dn2ops.embed.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def _normalised(p: Preprocessing, image: Image.Image) -> torch.Tensor:
    """One RGB PIL image -> float32 (3, crop, crop): the crop, then the normalisation."""
    return p.normalize(torch.from_numpy(p.crop_image(image)))


def test_constant_image_normalises_to_hand_computed_values():
    image = Image.new("RGB", (300, 500), (255, 0, 128))
    out = _normalised(Preprocessing(), image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_MEAN,
                                                     IMAGENET_STD, strict=True)]
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)


def test_short_side_resized_then_center_cropped():
    # A 28x56 image: short side -> 8, long side -> 16, center crop 8x8 keeps the middle.
    arr = np.zeros((28, 56, 3), np.uint8)
    arr[:, 14:42] = 255  # the middle half is white
    p = Preprocessing(resize=8, crop=8, mean=(0, 0, 0), std=(1, 1, 1))
    out = _normalised(p, Image.fromarray(arr))
    assert out.shape == (3, 8, 8)
    # Only the white middle survives the crop; antialiasing blends the two edge columns.
    assert out[:, :, 1:-1].min() == 1.0 and out.min() > 0.8


def test_geometry_is_uint8_and_normalisation_batched_matches_single():
    p = Preprocessing()
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8))
    crop = p.crop_image(im)
    assert crop.dtype == np.uint8 and crop.shape == (3, 224, 224)
    batched = p.normalize(torch.from_numpy(np.stack([crop, crop])))
    torch.testing.assert_close(batched[0], p.normalize(torch.from_numpy(crop)))


def test_to_dict_records_every_field_and_bad_crop():
    p = Preprocessing(resize=300, crop=260)
    assert p.to_dict() == {"resize": 300, "crop": 260, "mean": list(IMAGENET_MEAN),
                           "std": list(IMAGENET_STD)}
    with pytest.raises(ValueError, match="crop"):
        Preprocessing(resize=200, crop=224)


@pytest.mark.parametrize("size", [(640, 427), (427, 640), (28, 28), (300, 299)])
def test_geometry_equals_torchvision_resize_and_center_crop_within_rounding(size):
    from torchvision.transforms import v2

    from benchmarks.datasets import phone_photo

    image = phone_photo(0, size=size)
    p = Preprocessing()
    reference = v2.Compose([v2.PILToTensor(), v2.Resize(256, antialias=True),
                            v2.CenterCrop(224)])(image).numpy().astype(int)
    got = p.crop_image(image)
    assert got.shape == reference.shape == (3, 224, 224)
    assert np.abs(got - reference).max() <= 1 and (got != reference).mean() < 0.01
