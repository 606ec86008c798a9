"""The torch side of dn2's ONNX export (dn2ops.embed.export): the graph the CPU engines
run, a backbone with the preprocessing's normalisation in front, and torch.onnx.export.

Imported only by a process that exports: a worker whose export is cached never imports
torch (dn2ops.embed.export).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from dn2ops.embed.preprocess import Preprocessing


class Normalized(nn.Module):
    """uint8 (N, 3, H, W) -> backbone features (N, dim): the preprocessing's
    normalisation ((x / 255 - mean) / std, as torchvision's ToDtype + Normalize)
    followed by the backbone."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) / 255.0
        return self.model((x - self.mean) / self.std)


def to_onnx(module: nn.Module, crop: int, path: str, opset: int) -> None:
    """``module`` (uint8 (N, 3, crop, crop) -> features) exported to ``path``, one
    self-contained file of ONNX operator set ``opset``."""
    # torch.export-based exporter (the default since torch 2.9; the TorchScript one is
    # deprecated). The batch dimension stays dynamic, so one file serves every batch size.
    example = torch.zeros(2, 3, crop, crop, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad(), _quiet("onnxscript", "onnx_ir"):
        torch.onnx.export(module, (example,), path, input_names=["images"],
                          output_names=["features"], dynamic_shapes=({0: batch},),
                          opset_version=opset, dynamo=True, external_data=False,
                          optimize=True, verbose=False)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The exporter's rewriters log every rule they apply at INFO: keep dn2's log readable."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)

