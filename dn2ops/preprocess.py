"""Image preprocessing as in the DN2 paper: resize, center-crop, normalise."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(resize=int(d["resize"]), crop=int(d["crop"]),
                   mean=tuple(float(v) for v in d["mean"]),
                   std=tuple(float(v) for v in d["std"]))

    def geometry(self) -> v2.Compose:
        """RGB PIL image -> uint8 tensor (3, crop, crop): resize, then center-crop."""
        return v2.Compose([
            v2.PILToTensor(),
            v2.Resize(self.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(self.crop),
        ])

    def normalization(self) -> v2.Compose:
        """uint8 (..., 3, H, W) -> float32 scaled to [0, 1] then mean/std normalised."""
        return v2.Compose([
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ])

    # Geometry runs per image on the reading worker and ships uint8 (4x smaller
    # than float32); normalisation runs batched next to the model.
    @functools.cached_property
    def crop_image(self) -> v2.Compose:
        return self.geometry()

    @functools.cached_property
    def normalize(self) -> v2.Compose:
        return self.normalization()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> normalised float32 tensor (3, crop, crop)."""
        return self.normalize(self.crop_image(image))
