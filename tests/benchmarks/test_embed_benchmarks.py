"""The embedding benchmarks measure what they say: the bare loop's crops are dn2's crops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks import embed_speed, embed_workloads, gpu_check
from benchmarks.datasets import phone_photo
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.stage import prepare


@pytest.mark.parametrize("orientation", [1, 6])
def test_the_bare_loop_crops_what_dn2_crops(tmp_path, orientation):
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    phone_photo(1, size=(2016, 1512)).save(path, "JPEG", quality=90, exif=exif.tobytes())
    pre = get_spec("efficientnet_lite0").preprocessing

    bare = embed_workloads.bare_pixels(path.read_bytes(), pre.resize, pre.crop)
    dn2 = prepare({"uri": str(path)}, pre)[1]

    assert bare.shape == dn2.shape == (3, 224, 224) and bare.dtype == np.uint8
    # PIL's and torchvision's antialiased bilinear resizes differ by rounding only
    assert np.abs(bare.astype(int) - dn2).mean() < 0.5


def test_engine_table_runs_every_engine(tmp_path, capsys):
    res = embed_speed.main(["--backbones", "efficientnet_lite0", "--batches", "2",
                            "--rounds", "1", "--seconds", "0.01", "--out", str(tmp_path)])
    row = res["backbones"]["efficientnet_lite0"]
    assert set(row["images_per_s"][2]) >= {"torch", "openvino"}
    assert all(v > 0 for v in row["images_per_s"][2].values())
    assert all(d <= 1e-4 * row["feature_scale"] for d in row["max_abs_diff"].values())
    assert "| efficientnet_lite0 | 2 |" in (tmp_path / "engines.md").read_text()


def test_gpu_decoding_is_skipped_with_its_reason_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: benchmarks/gpu_check.py measures it")
    path = tmp_path / "p.jpg"
    phone_photo(0, size=(64, 48)).save(path, "JPEG")
    assert gpu_check.decode_rates([str(path)], batch=64) == {"skipped": "no CUDA GPU"}
