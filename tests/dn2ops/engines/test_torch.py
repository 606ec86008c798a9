"""Batched embedding: the fast CPU path equals the plain path; devices fail fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dn2ops.embed.backbones import load_backbone
from dn2ops.engines.torch import DeviceError, Embedder, resolve_device


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


def test_auto_device_is_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto").type == "cpu"


def test_asking_for_cuda_without_one_fails_fast():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_unknown_device():
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")


@pytest.mark.gpu
def test_cuda_path_matches_cpu_within_bf16_tolerance(batch):
    cpu = Embedder(load_backbone("efficientnet_lite0"), device="cpu")(batch)
    gpu = Embedder(load_backbone("efficientnet_lite0"), device="cuda")(batch)
    cos = (cpu * gpu).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(gpu, axis=1)
    assert cos.min() > 0.99
