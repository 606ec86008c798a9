"""``--engine torch``: dn2's backbone as a torch module, on the CPU or a CUDA GPU, as a
Beam model handler.

CPU: channels-last memory format under ``torch.inference_mode`` (oneDNN's
fast convolution layout; measured in benchmarks/embed_speed.py).
CUDA: pinned host memory, non-blocking copies and autocast to bf16 (fp16
where the GPU has no bf16); features come back as float32 either way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from apache_beam.ml.inference.base import PredictionResult
from torch import nn

from dn2ops.embed.backbones import load_backbone
from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.base import (
    Dn2ModelHandler,
    engine_batch,
    in_slices,
    on_gpu,
    resolve_device,
    thread_plan,
)

LOG = logging.getLogger("dn2")


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
            LOG.info("embedding on %s with autocast %s", self.device, self._amp_dtype)

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


class TorchModelHandler(Dn2ModelHandler[np.ndarray, PredictionResult, Embedder]):
    """uint8 batches (N, 3, crop, crop) -> pooled backbone features (dim,) float32,
    normalised with torchvision and run by an Embedder (``fast``: see Embedder), in slices
    of dn2ops.engines.base.engine_batch images (a whole batch on a GPU)."""

    def __init__(self, plan: EmbedPlan, *, fast: bool = True):
        super().__init__(batch_size=plan.config.batch_size)
        self.plan = plan
        self.fast = fast
        self._engine_batch: int | None = None  # resolved on the worker: its device

    def load_model(self) -> Embedder:
        threads, _ = thread_plan(self.plan)
        torch.set_num_threads(threads)
        config = self.plan.config
        LOG.info("engine torch %s: %s on %s, %d threads", torch.__version__,
                 self.plan.backbone, config.device, threads)
        return Embedder(load_backbone(self.plan.backbone, config.weights),
                        device=config.device, fast=self.fast)

    def run_inference(self, batch: Sequence[np.ndarray], model: Embedder,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        if self._engine_batch is None:
            self._engine_batch = engine_batch(self.plan.config, on_gpu(self.plan.config))
        normalize = self.plan.preprocessing.normalize
        features = in_slices(lambda x: model(normalize(torch.from_numpy(x))), batch,
                             self._engine_batch)
        # The example is not kept: it would carry 150 KB per image downstream.
        return [PredictionResult(None, f) for f in features]
