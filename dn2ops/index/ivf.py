"""IVF indexes (IVF-Flat or IVF-PQ) for normal sets too large for exact search.

Built from a chunk stream (see dn2ops.index.streams), never holding all vectors:

1. train the coarse quantizer (and PQ codebooks) on a uniform sample;
2. add the vectors chunk by chunk, with their global ids; with ``ondisk`` each
   chunk goes into its own small index file and faiss's
   ``contrib.ondisk.merge_ondisk`` merges the inverted lists into one
   ``ivf.ivfdata`` file that searches memory-map (lists larger than memory);
3. measure recall@k against exact search on a sample of the normal set
   (leave-one-out: each query's own id is removed from both neighbour lists,
   as for the percentile reference) at nprobe = 1, 2, 4, ... and pick the
   smallest nprobe that reaches the target recall (or use the one given).

The vectors are centred (faiss.CenteringTransform, trained on the sample)
before the IVF: L2 distances are unchanged but the norms shrink, which keeps
faiss's float32 ``|x|^2 + |y|^2 - 2<x, y>`` distances accurate (see
dn2ops.index.knn). Scores from an IVF index are APPROXIMATE: a true neighbour in a
list that was not probed is missed and a farther one takes its place, so IVF
scores are >= the exact ones; the recall in the manifest says how often.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np

from dn2ops.errors import ConfigError
from dn2ops.index import recall
from dn2ops.index.recall import recall_at_k

__all__ = ["build", "new_index", "read", "recall_at_k", "search", "set_nprobe"]

INDEX_FILE = "ivf.faiss"
DATA_FILE = "ivf.ivfdata"
# faiss wants >= 39 training points per list; 64 gives steadier lists, and the
# quantizer's k-means subsamples to 256 per list anyway.
TRAIN_PER_LIST = 64


def new_index(d: int, nlist: int, pq: int | None = None) -> faiss.Index:
    """Untrained centring + IVF-Flat (pq None) or IVF-PQ (pq sub-quantizers of 8 bits)."""
    if nlist < 1:
        raise ValueError(f"--ivf NLIST must be >= 1, got {nlist}")
    quantizer = faiss.IndexFlatL2(d)
    if pq is None:
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    else:
        if pq < 1 or d % pq:
            raise ConfigError(f"--pq M must divide the dimension {d}, got {pq}")
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, pq, 8)
    ivf.cp.niter = 10  # the coarse k-means: 10 iterations (faiss's own IVF default is 10 too)
    index = faiss.IndexPreTransform(faiss.CenteringTransform(d), ivf)
    return index


def ivf_of(index: faiss.Index) -> faiss.IndexIVF:
    return faiss.extract_index_ivf(index)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    ivf = ivf_of(index)
    ivf.nprobe = int(min(max(1, nprobe), ivf.nlist))


def _copy(index: faiss.Index) -> faiss.Index:
    # faiss cannot clone a CenteringTransform; a serialisation round trip can.
    return faiss.deserialize_index(faiss.serialize_index(index))


def search(index: faiss.Index, xq: np.ndarray, k: int,
           fallback: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k-NN: ``D`` float32 (nq, k) Euclidean (not squared), ``I`` int64 (nq, k).

    Queries whose probed lists hold fewer than k vectors are searched again
    over every list (of ``fallback``, the CPU index, when ``index`` is a GPU
    copy), so every row has k real neighbours.
    """
    cpu = fallback if fallback is not None else index
    return recall.search_filled(index, xq, k, lambda: (ivf_of(cpu), "nprobe",
                                                       ivf_of(cpu).nlist), again=cpu)


def train_size(n: int, nlist: int, pq: int | None = None) -> int:
    """Rows to train an IVF of ``nlist`` lists on (all of them for small sets)."""
    want = TRAIN_PER_LIST * nlist if pq is None else max(TRAIN_PER_LIST * nlist, 256 * 64)
    return min(n, want)


def build(chunks: Callable[[], Iterator[np.ndarray]], n: int, d: int, *, k: int, nlist: int,
          train_x: np.ndarray, q_ids: np.ndarray, xq: np.ndarray, pq: int | None = None,
          nprobe: int | None = None, target_recall: float = 0.95,
          ondisk_dir: str | None = None) -> tuple[faiss.Index, dict[str, Any]]:
    """Trains and fills an IVF index over the ``n`` vectors of the chunk stream ``chunks()``.

    ``train_x``: a uniform sample to train on (train_size rows); ``q_ids`` and
    ``xq``: the ids and rows of a uniform sample that recall is measured on
    (gathered by the caller in a pass it makes anyway). ``ondisk_dir``: a
    local directory; the inverted lists are merged into
    ``ondisk_dir/ivf.ivfdata`` and the returned index refers to that file
    (write it next to it with faiss.write_index and read it back with
    `read`). Returns (index with nprobe set, info for the manifest).
    """
    if n < k + 2:
        raise ConfigError(f"an IVF index needs at least k + 2 = {k + 2} vectors, got {n}")
    nlist = int(min(nlist, n))
    index = new_index(d, nlist, pq)
    index.train(train_x)
    parts: list[str] = []
    # One pass over the stream fills the IVF and feeds the exact search that recall is
    # measured against.
    I_exact = recall.exact_ids(xq, q_ids, _fill(index, chunks(), parts, ondisk_dir), k)
    if ondisk_dir is not None:
        _merge_parts(index, parts, ondisk_dir)
    if index.ntotal != n:
        raise RuntimeError(f"the IVF index holds {index.ntotal} vectors, expected {n}")
    probes = list(dict.fromkeys(min(2 ** i, nlist) for i in range(int(np.log2(nlist)) + 2)))
    _, curve = recall.measure(lambda x, kk: search(index, x, kk),
                              lambda p: set_nprobe(index, p), xq, q_ids, I_exact, probes,
                              target_recall, nprobe)
    got = curve[int(ivf_of(index).nprobe)]
    info = {"nlist": nlist, "pq": pq, "nprobe": int(ivf_of(index).nprobe),
            "ondisk": ondisk_dir is not None, "train_size": int(len(train_x)),
            "recall": recall.recall_info(k, q_ids, target_recall, curve, got, "nprobe",
                                         "IVF")}
    return index, info


def _fill(index: faiss.Index, blocks: Iterator[np.ndarray], parts: list[str],
          ondisk_dir: str | None) -> Iterator[np.ndarray]:
    """Adds each block to ``index`` (global ids in order; with ``ondisk_dir``, to a copy
    written as a part file, its name appended to ``parts``) and yields it on."""
    start = 0
    for chunk in blocks:
        ids = np.arange(start, start + len(chunk), dtype=np.int64)
        if ondisk_dir is None:
            index.add_with_ids(chunk, ids)
        else:
            part = _copy(index)
            part.add_with_ids(chunk, ids)
            parts.append(os.path.join(ondisk_dir, f"_part-{len(parts):05d}.faiss"))
            faiss.write_index(part, parts[-1])
            del part
        start += len(chunk)
        yield chunk


def _merge_parts(index: faiss.Index, parts: list[str], ondisk_dir: str) -> None:
    """Merges the part files' inverted lists into ``ondisk_dir/ivf.ivfdata``."""
    from faiss.contrib.ondisk import merge_ondisk

    merge_ondisk(index, parts, os.path.join(ondisk_dir, DATA_FILE))
    for p in parts:
        os.remove(p)


def read(path: str, *, ondisk: bool, nprobe: int) -> faiss.Index:
    """Reads an IVF index file; on-disk lists are memory-mapped from the file beside it."""
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk else 0
    index = faiss.read_index(path, flags)
    set_nprobe(index, nprobe)
    return index
