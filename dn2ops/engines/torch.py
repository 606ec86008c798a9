"""Batched embedding: normalised image batches -> pooled backbone features.

CPU: channels-last memory format under ``torch.inference_mode`` (oneDNN's
fast convolution layout; measured in benchmarks/embed_speed.py).
CUDA: pinned host memory, non-blocking copies and autocast to bf16 (fp16
where the GPU has no bf16); features come back as float32 either way.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """A device was asked for that this machine does not have."""


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when present else cpu; 'cuda' without a GPU fails fast."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    if device == "cuda" and not has_cuda:
        raise DeviceError("--device cuda was asked for but torch sees no CUDA GPU "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")
    return torch.device(device)


class Embedder:
    """Runs a feature backbone on batches.

    Args:
      model: maps (N, 3, H, W) float32 to (N, dim).
      device: 'auto' | 'cpu' | 'cuda'.
      fast: channels-last + inference_mode (CPU) / autocast + pinned memory (CUDA).
        False runs the plain float32 NCHW path under no_grad, the reference.
    """

    def __init__(self, model: nn.Module, *, device: str = "auto", fast: bool = True):
        self.device = resolve_device(device)
        self.fast = fast
        self.model = model.eval().to(self.device)
        if fast:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._amp_dtype = None
        if fast and self.device.type == "cuda":
            self._amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported()
                               else torch.float16)
            logging.getLogger("dn2").info("embedding on %s with autocast %s", self.device,
                                          self._amp_dtype)

    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) float32 -> features (N, dim) float32."""
        x = torch.as_tensor(batch, dtype=torch.float32)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        if not self.fast:
            with torch.no_grad():
                return self.model(x).float().cpu().numpy()
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(
                self.device.type, dtype=self._amp_dtype, enabled=self._amp_dtype is not None):
            return self.model(x).float().cpu().numpy()
