"""dn2ops.index.gpu: faiss device selection here (no GPU), and GPU == CPU where a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest

from dn2ops.engines.base import DeviceError
from dn2ops.index import gpu
from dn2ops.index.knn import knn_sharded

NO_GPU = gpu.faiss_gpus() == 0


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU faiss can use")
def test_without_a_gpu_auto_is_cpu_and_cuda_fails_fast():
    assert gpu.resolve_faiss_device("auto") == "cpu"
    assert gpu.resolve_faiss_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match="--device cuda was asked for but faiss cannot use a "
                                          "GPU.*use --device cpu or auto"):
        gpu.resolve_faiss_device("cuda")


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="device must be one of"):
        gpu.resolve_faiss_device("tpu")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU faiss can use")
def test_loaded_index_with_cuda_fails_before_reading(tmp_path):
    from dn2ops.index import LoadedIndex
    from dn2ops.io.outputs import MARKER

    (tmp_path / MARKER).write_text('{"kind": "index", "files": {}}')
    with pytest.raises(DeviceError, match="faiss cannot use a GPU"):
        LoadedIndex(str(tmp_path), device="cuda")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU faiss can use")
def test_build_index_with_cuda_fails_before_reading(tmp_path):
    from dn2ops.index import build_index

    with pytest.raises(DeviceError, match="faiss cannot use a GPU"):
        build_index(str(tmp_path / "missing"), str(tmp_path / "out"), device="cuda")


@pytest.mark.gpu
def test_gpu_search_equals_cpu_within_float_tolerance():
    assert gpu.resolve_faiss_device("auto") == "cuda"
    rng = np.random.default_rng(0)
    # A large common offset: the case the CPU path's shift + re-rank exists for.
    xb = (rng.standard_normal((5000, 64)) + 30).astype(np.float32)
    xq = (rng.standard_normal((300, 64)) + 30).astype(np.float32)
    shards = [xb[:2000], xb[2000:4500], xb[4500:]]
    Dc, Ic = knn_sharded(xq, shards, 3)
    Dg, Ig = gpu.knn_sharded_gpu(xq, [gpu.GpuFlat(s) for s in shards], 3)
    np.testing.assert_allclose(Dg, Dc, rtol=1e-5)
    assert (Ig == Ic).mean() > 0.99  # only near-ties may swap
