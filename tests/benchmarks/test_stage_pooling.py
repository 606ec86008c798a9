"""benchmarks/stage_pooling_quick.py: its stage taps and treatments, by hand."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.array_features import crops
from benchmarks.stage_pooling_quick import BACKBONE, pooled_stages, treatment
from dn2ops.embed.backbones import get_spec, load_backbone
from tests.conftest import digit_images, sqrt_l2


def test_the_final_tap_is_dn2s_feature_and_stages_have_their_widths():
    images = digit_images(n_normal=4, n_incoming=0)[0]
    got = pooled_stages(images, batch=3)
    model = load_backbone(BACKBONE, None).eval()
    prep = get_spec(BACKBONE).preprocessing
    with torch.inference_mode():
        want = model(prep.normalize(torch.from_numpy(np.stack(crops(images, BACKBONE)))))
    np.testing.assert_allclose(got["final"], want.numpy(), rtol=1e-5, atol=1e-5)
    assert {k: v.shape for k, v in got.items()} == {
        "final": (4, 1280), "s5": (4, 112), "s6": (4, 192), "s7": (4, 320)}


def test_each_part_of_a_treatment_is_sqrt_l2_on_its_own():
    rng = np.random.default_rng(0)
    feats = {"final": rng.random((5, 6)), "s7": rng.random((5, 3))}
    x = treatment(feats, ("s7",), slice(None))
    np.testing.assert_allclose(x[:, :6], sqrt_l2(feats["final"]), rtol=1e-6)
    np.testing.assert_allclose(x[:, 6:], sqrt_l2(feats["s7"]), rtol=1e-6)
