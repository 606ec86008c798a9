"""faiss on the GPU: device selection and the exact flat search on a GPU.

``--device auto`` puts faiss indexes on every GPU faiss can see (the ``gpu``
extra installs faiss-gpu), else keeps them on the CPU; ``--device cpu``
forces the CPU; ``--device cuda`` without a GPU faiss can use fails fast,
before any heavy work, naming what is missing.

The GPU flat search keeps dn2's exactness contract (see dn2ops.index.knn): the GPU
only proposes the k candidates of each query (over the shard shifted by its
mean), and their distances are recomputed on the CPU from coordinate
differences and re-sorted, so results equal the CPU path's within float
round-off. IVF indexes are copied to the GPU as they are (their scores are
approximate on either device); on-disk inverted lists stay on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import faiss
import numpy as np

from dn2ops.engines.base import DeviceError
from dn2ops.index.knn import as_float32, exact_distances, knn_sharded

# The same choices as dn2ops.engines.base.DEVICES (the embedding side of --device).
DEVICES = ("auto", "cpu", "cuda")

LOG = logging.getLogger("dn2")


def faiss_gpus() -> int:
    """Number of GPUs this faiss build can use (0 for faiss-cpu or without a GPU)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def resolve_faiss_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when faiss sees a GPU else 'cpu'; 'cuda' without one raises DeviceError."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    n = faiss_gpus()
    if device == "auto":
        return "cuda" if n > 0 else "cpu"
    if device == "cuda" and n == 0:
        has_gpu_build = hasattr(faiss, "StandardGpuResources")
        why = ("this faiss build has GPU support but sees no GPU"
               if has_gpu_build else
               "the installed faiss is CPU-only (faiss-cpu); install the gpu extra: "
               "pip install 'dn2[gpu]' (faiss-gpu-cu12)")
        raise DeviceError(f"--device cuda was asked for but faiss cannot use a GPU: {why}; "
                          "use --device cpu or auto")
    return device


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` spread over every GPU faiss sees (call only after resolving 'cuda')."""
    return faiss.index_cpu_to_all_gpus(index)


class GpuFlat:
    """One flat shard resident on the GPU(s), shifted by its mean, with its CPU
    vectors (nb, d) kept for the exact re-rank (a dn2ops.index.knn.ExactShard)."""

    def __init__(self, xb: np.ndarray):
        self.xb = as_float32(xb, name="xb")
        self.shift = self.xb.mean(axis=0, dtype=np.float64).astype(np.float32)
        cpu = faiss.IndexFlatL2(self.xb.shape[1])
        cpu.add(self.xb - self.shift)
        self.index = to_gpu(cpu)

    def __len__(self) -> int:
        return len(self.xb)

    @property
    def d(self) -> int:
        return int(self.xb.shape[1])

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN (k' = min(k, nb)): ``D`` float32 (nq, k') ascending, ``I`` int64 (nq, k').

        The GPU proposes the candidates; their distances are recomputed on the
        CPU from coordinate differences (as dn2ops.index.knn.knn) and re-sorted.
        """
        k = min(int(k), len(self.xb))
        _, I = self.index.search(xq - self.shift, k)
        D = exact_distances(xq, self.xb, I)
        order = np.argsort(D, axis=1, kind="stable")
        return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def knn_sharded_gpu(xq: np.ndarray, shards: Iterable[np.ndarray | GpuFlat],
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """dn2ops.index.knn.knn_sharded with each shard searched on the GPU: exact k-NN of ``xq``
    (nq, d) over shards (arrays are put on the GPU one at a time, GpuFlat used as is).

    Returns ``D`` float32 (nq, k) Euclidean distances and ``I`` int64 (nq, k) global ids
    (offsets = running shard sizes).
    """
    return knn_sharded(xq, (s if isinstance(s, GpuFlat) else GpuFlat(s) for s in shards), k)
