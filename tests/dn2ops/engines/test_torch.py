"""--engine torch: the fast CPU path equals the plain path; the handler normalises and
embeds as the reference does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dn2ops.config import EmbedConfig
from dn2ops.embed.backbones import load_backbone
from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.torch import Embedder, TorchModelHandler

BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def batch():
    return torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_fast_path_gives_the_same_features_as_the_plain_path(batch):
    slow = Embedder(load_backbone("efficientnet_lite0"), device="cpu", fast=False)(batch)
    fast = Embedder(load_backbone("efficientnet_lite0"), device="cpu", fast=True)(batch)
    assert fast.shape == slow.shape == (4, 1280) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)


def test_features_do_not_depend_on_the_batch(batch):
    emb = Embedder(load_backbone("efficientnet_lite0"), device="cpu")
    whole = emb(batch)
    singles = np.concatenate([emb(batch[i:i + 1]) for i in range(len(batch))])
    np.testing.assert_allclose(whole, singles, rtol=1e-4, atol=1e-4)


def test_handler_normalises_uint8_batches_as_the_plain_reference(real_batch):
    """uint8 crops -> (x / 255 - mean) / std by hand -> the backbone under no_grad, on
    the whole batch; the handler runs it in engine batches of 3 (3 + 3 + 2)."""
    plan = EmbedPlan.resolve(EmbedConfig(backbone=BACKBONE, engine="torch", device="cpu",
                                         batch_size=len(real_batch), engine_batch=3))
    handler = TorchModelHandler(plan, fast=False)
    got = np.stack([r.inference for r in handler.run_inference(list(real_batch),
                                                               handler.load_model())])
    pre = plan.preprocessing
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
    x = (torch.from_numpy(real_batch).float() / 255 - mean) / std
    with torch.no_grad():
        want = load_backbone(BACKBONE).eval()(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_path_matches_cpu_within_bf16_tolerance(batch):
    cpu = Embedder(load_backbone("efficientnet_lite0"), device="cpu")(batch)
    gpu = Embedder(load_backbone("efficientnet_lite0"), device="cuda")(batch)
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > 0.99
