"""The exported backbone: one ONNX file per weights, cached on local disk.

The ONNX Runtime and OpenVINO engines run the same dn2 backbone as the torch
engine, exported here from the loaded torch module. The exported graph takes the
uint8 batch that PrepareImages makes, (N, 3, crop, crop), and normalises it
inside (cast, scale to [0, 1], mean/std), so an engine gets its input without a
float copy made in Python; its output is the pooled feature (N, dim) float32.

Export costs seconds (torch.export, then the ONNX rewrite), so the file is kept
under ``cache_dir`` with a name made from the sha256 of the weights actually
loaded (plus what else shapes the graph): a worker exports once, and a file
made for other weights is never picked up. Writes go to a temporary name and
are renamed into place, so processes that export at the same time on one
machine never read a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator

import torch
from torch import nn

from dn2ops.embed.backbones import get_spec, load_backbone
from dn2ops.embed.preprocess import Preprocessing

LOG = logging.getLogger("dn2")

# Part of the cache key: bump when the exported graph changes for the same weights.
EXPORT_VERSION = 1
# The ONNX operator set exported; ONNX Runtime and OpenVINO both read it.
OPSET = 18


def default_cache_dir() -> str:
    """Local disk of this machine (a Dataflow worker's /tmp lives as long as the worker)."""
    return os.path.join(tempfile.gettempdir(), "dn2-exports")


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


def weights_sha256(model: nn.Module) -> str:
    """sha256 (hex) of a module's state: every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-d counters
    return h.hexdigest()


def export_key(backbone: str, model: nn.Module, preprocessing: Preprocessing) -> str:
    """What names an export: the weights' sha256 and everything else that shapes the graph."""
    h = hashlib.sha256()
    h.update(f"{backbone};{weights_sha256(model)};{preprocessing.to_dict()};"
             f"v{EXPORT_VERSION};opset{OPSET};torch{torch.__version__}".encode())
    return h.hexdigest()


def export_backbone(backbone: str, weights: str | None = None,
                    cache_dir: str | None = None) -> str:
    """Loads backbone ``backbone`` with ``weights`` (as dn2ops.embed.backbones.load_backbone)
    and returns the path of its cached ONNX export (see export_onnx)."""
    model = load_backbone(backbone, weights)
    return export_onnx(backbone, model, get_spec(backbone).preprocessing, cache_dir)


def export_onnx(backbone: str, model: nn.Module, preprocessing: Preprocessing,
                cache_dir: str | None = None) -> str:
    """The path of ``model`` exported to ONNX (uint8 input, see the module docstring),
    exporting it only when the cache holds no export of these weights."""
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"{backbone}-{export_key(backbone, model, preprocessing)[:24]}"
                                   ".onnx")
    if os.path.exists(path):
        LOG.info("engine model: cached export %s", path)
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    LOG.info("engine model: exporting %s to %s (once per machine)", backbone, path)
    try:
        _export(Normalized(model, preprocessing).eval(), preprocessing.crop, tmp)
        os.replace(tmp, path)  # atomic: another process's export of the same key is identical
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _export(module: nn.Module, crop: int, path: str) -> None:
    # torch.export-based exporter (the default since torch 2.9; the TorchScript one is
    # deprecated). The batch dimension stays dynamic, so one file serves every batch size.
    example = torch.zeros(2, 3, crop, crop, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad(), _quiet("onnxscript", "onnx_ir"):
        torch.onnx.export(module, (example,), path, input_names=["images"],
                          output_names=["features"], dynamic_shapes=({0: batch},),
                          opset_version=OPSET, dynamo=True, external_data=False,
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
