"""The embedding plan: what the launcher resolves once, before any pipeline starts, and
hands whole to the embedding stage (dn2ops.embed.stage.EmbedImages) and to the engines'
model handlers (dn2ops.engines).

The launcher knows the backbone's spec (name, dim, preprocessing: the metadata features
are checked against) and the weights, which it loads once here to hash them (the sha256
recorded with the features and checked by ``--reuse``, and the key of the ONNX export
that the CPU engines run: dn2ops.embed.export finds a cached export by the plan alone,
so a worker loads the torch backbone only to export it). What depends on the machine
that runs the model is left to each worker process, in its handler's ``load_model``:
the engine that ``auto`` picks, the device, the export cache's directory on local disk.
A launcher without a GPU must not choose the engine of workers that have one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any

from dn2ops.config import EmbedConfig
from dn2ops.embed.backbones import BackboneSpec, get_spec, load_backbone
from dn2ops.embed.preprocess import Preprocessing

if TYPE_CHECKING:
    from torch import nn


def weights_sha256(model: nn.Module) -> str:
    """sha256 (hex) of a module's state: every tensor's name, dtype, shape and bytes."""
    import torch  # a worker that runs a cached export never imports torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-d counters
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class EmbedPlan:
    """How images become features, resolved once (picklable: it travels to the workers).

    ``config``: the embedding flags, whole; ``spec``: the spec of ``config.backbone``;
    ``weights_sha256``: of the weights loaded (weights_sha256);
    ``workers``: the model calls that run at once on one machine and share its cores
    (None: one SDK process per core, as Dataflow runs Python; see
    dn2ops.engines.base.thread_plan); ``shared``: the model is loaded once per machine
    and its SDK processes share it (dn2ops.engines.shared; the launcher decides, by
    dn2ops.engines.base.shares_model).
    """

    config: EmbedConfig
    spec: BackboneSpec
    weights_sha256: str
    workers: int | None = 1
    shared: bool = False

    @classmethod
    def resolve(cls, config: EmbedConfig, *, spec: BackboneSpec | None = None,
                workers: int | None = 1, shared: bool = False,
                weights_hash: str | None = None) -> EmbedPlan:
        """The plan of ``config``: its backbone's spec (``spec``: looked up already) and
        its weights, loaded once to hash them (``weights_hash``: hashed already, as the
        launcher does from dn2ops.embed.weights_memo). Raises ConfigError for an unknown
        backbone, WeightsError for weights missing, unreadable or unfit."""
        spec = spec or get_spec(config.backbone)
        if weights_hash is None:
            weights_hash = weights_sha256(load_backbone(spec.name, config.weights))
        return cls(config, spec, weights_hash, workers, shared)

    @property
    def backbone(self) -> str:
        return self.spec.name

    @property
    def preprocessing(self) -> Preprocessing:
        return self.spec.preprocessing

    def metadata(self) -> dict[str, Any]:
        """What features made by this plan are checked against later: the backbone's
        metadata and the weights' sha256."""
        return {**self.spec.metadata(), "weights_sha256": self.weights_sha256}
