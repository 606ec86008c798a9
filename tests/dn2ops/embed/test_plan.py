"""EmbedPlan: the backbone's spec and the weights' sha256, resolved once, whole to the
workers."""

from __future__ import annotations

import pytest
import torch
from apache_beam.internal import pickler

from dn2ops.config import DEFAULT_BACKBONE, EmbedConfig
from dn2ops.embed.backbones import WeightsError, get_spec, load_backbone
from dn2ops.embed.export import weights_sha256
from dn2ops.embed.plan import EmbedPlan
from dn2ops.errors import UserError


def test_the_plan_holds_the_spec_and_the_hash_of_the_weights_it_loaded():
    config = EmbedConfig(backbone="efficientnet_lite0", batch_size=8)
    plan = EmbedPlan.resolve(config, workers=None)
    spec = get_spec("efficientnet_lite0")
    assert (plan.config, plan.spec, plan.workers) == (config, spec, None)
    assert (plan.backbone, plan.preprocessing) == ("efficientnet_lite0", spec.preprocessing)
    assert plan.weights_sha256 == weights_sha256(load_backbone("efficientnet_lite0"))
    assert plan.metadata() == {**spec.metadata(), "weights_sha256": plan.weights_sha256}


def test_the_hash_is_of_the_users_weights(tmp_path):
    model = get_spec("resnet18").build()
    torch.nn.init.constant_(model.conv1.weight, 0.5)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    plan = EmbedPlan.resolve(EmbedConfig(backbone="resnet18",
                                         weights=str(tmp_path / "r18.pth")))
    assert plan.weights_sha256 == weights_sha256(model)
    assert plan.weights_sha256 != weights_sha256(get_spec("resnet18").build())


def test_an_unknown_backbone_or_missing_weights_fail_when_planning():
    with pytest.raises(UserError, match="unknown backbone 'vgg'"):
        EmbedPlan.resolve(EmbedConfig(backbone="vgg"))
    with pytest.raises(WeightsError, match="--weights PATH_OR_URI"):
        EmbedPlan.resolve(EmbedConfig(backbone="resnet18"))


def test_the_plan_travels_to_the_workers_with_beams_pickler():
    """The composite's spec builds its parts from closures: they must survive pickling."""
    plan = EmbedPlan.resolve(EmbedConfig(backbone=DEFAULT_BACKBONE))
    got = pickler.loads(pickler.dumps(plan))
    assert (got.config, got.weights_sha256, got.workers) == (plan.config,
                                                             plan.weights_sha256, 1)
    assert got.spec.metadata() == plan.spec.metadata() and got.spec.parts == plan.spec.parts
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        assert got.spec.build().eval()(x).shape == (1, plan.spec.dim) == (1, 2560)
