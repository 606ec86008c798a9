"""Image preprocessing as in the DN2 paper: resize, center-crop, normalise."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to ``resize``, center-crop ``crop``, then normalise.

    Recorded with every feature shard and index so that features made with
    another preprocessing are never mixed with these.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.crop > self.resize or self.crop <= 0:
            raise ValueError(f"crop ({self.crop}) must be in 1..resize ({self.resize})")

    def to_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop,
                "mean": list(self.mean), "std": list(self.std)}

    def crop_image(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array (3, crop, crop): the short side resized to ``resize``
        (bilinear, antialiased: PIL's resampling, which torchvision's Resize follows), the
        long side to int(resize * long / short), then the center ``crop`` (torchvision's
        rounding of the offsets).

        PIL rather than torchvision on a tensor: PrepareImages runs this on many threads,
        and every thread that calls a torch operator gets its own OpenMP team, whose idle
        threads spin on the cores the engine and the decoding need.
        """
        w, h = image.size
        size = ((self.resize, int(self.resize * h / w)) if w <= h
                else (int(self.resize * w / h), self.resize))
        if size != image.size:
            image = image.resize(size, Image.BILINEAR)
        left, top = int(round((size[0] - self.crop) / 2.0)), int(round((size[1] - self.crop) / 2.0))
        box = (left, top, left + self.crop, top + self.crop)
        return np.ascontiguousarray(np.asarray(image.crop(box)).transpose(2, 0, 1))

    def normalization(self):
        """uint8 (..., 3, H, W) -> float32 scaled to [0, 1] then mean/std normalised."""
        import torch  # the torch engine's: a CPU-engine worker never imports torch
        from torchvision.transforms import v2

        return v2.Compose([
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ])

    # Geometry runs per image on the reading worker and ships uint8 (4x smaller
    # than float32); normalisation runs batched next to the model.
    @functools.cached_property
    def normalize(self):
        return self.normalization()
