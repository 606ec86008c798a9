"""The IVF kind (``--ivf NLIST``): a centred IVF-Flat or IVF-PQ index, ``ivf.faiss`` (and
``ivf.ivfdata`` with its inverted lists on disk, ``--ondisk``); nprobe tuned for recall@k
(dn2ops.index.ivf). Scores are approximate (>= exact)."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from dn2ops.config import IndexConfig
from dn2ops.errors import ConfigError
from dn2ops.index import gpu, streams
from dn2ops.index import ivf as faiss_ivf
from dn2ops.index.files import IndexDir, IndexError_, corrupt, file_sha256, write_index
from dn2ops.index.kinds.base import ApproximateKind, Built, Growing, NeighbourSearcher, Source
from dn2ops.index.reference import Scorer, approx_loo, reference_scores
from dn2ops.io import outputs


class IvfSearcher(NeighbourSearcher):
    """Approximate k-NN over ``index`` (on the GPU, or ``cpu`` itself), queries short of k
    neighbours searched again over every list of ``cpu``."""

    def __init__(self, index: faiss.Index, cpu: faiss.Index, k: int):
        self.index, self.cpu, self.k = index, cpu, k

    def neighbours(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return faiss_ivf.search(self.index, xq, self.k, fallback=self.cpu)


def read_ivf(files: IndexDir, meta: dict[str, Any]) -> faiss.Index:
    """ivf.faiss with nprobe set, its sha256s checked first; on-disk lists memory-mapped."""
    if meta["ondisk"] and not isinstance(files.fs, LocalFileSystem):
        raise IndexError_("an index with on-disk inverted lists (--ondisk) must be on a "
                          "local filesystem; copy it there first")
    if not meta["ondisk"]:
        index = files.read_checked(faiss_ivf.INDEX_FILE)
        faiss_ivf.set_nprobe(index, meta["nprobe"])
        return index
    if files.verify:  # before faiss parses anything
        for name in (faiss_ivf.INDEX_FILE, faiss_ivf.DATA_FILE):
            files.check_file(name)
    try:
        return faiss_ivf.read(files.join(faiss_ivf.INDEX_FILE), ondisk=True,
                              nprobe=meta["nprobe"])
    except RuntimeError as e:  # faiss raises RuntimeError on corrupt bytes
        raise corrupt(faiss_ivf.INDEX_FILE, e) from None


class Ivf(ApproximateKind):
    """An IVF index, searched at the nprobe the build measured."""

    name = key = "ivf"
    how = "leave-one-out, IVF (approximate)"
    effort = "nprobe"

    def wanted(self, config: IndexConfig) -> bool:
        return config.ivf_lists is not None

    def check_output(self, config: IndexConfig, fs) -> None:
        if config.ondisk and not isinstance(fs, LocalFileSystem):
            raise ConfigError("--ondisk needs a local --output directory (faiss memory-maps "
                              "the inverted lists)")

    def check_addable(self, manifest: dict[str, Any], index_dir: str) -> None:
        if manifest[self.key].get("ondisk"):
            raise IndexError_(f"{index_dir} keeps its IVF lists on disk (--ondisk): --add "
                              "cannot append to them; build the index again")

    def build(self, fs, stage: str, src: Source, c: IndexConfig, device: str) -> Built:
        """ivf.faiss (and ivf.ivfdata with --ondisk); nprobe measured against the target."""
        n = src.n
        nlist = int(min(c.ivf_lists, n))
        train_ids = streams.sample_ids(n, faiss_ivf.train_size(n, nlist, c.pq_m), c.seed)
        q_ids = streams.sample_ids(n, c.recall_queries, c.seed + 1)
        # Samples are gathered during one pass over the features (a Tap), not in passes of
        # their own: at scale every pass is minutes of reading.
        tap = streams.Tap(src.chunks(), train_ids, q_ids, src.ref_ids)
        for _ in tap:
            pass
        index, info = faiss_ivf.build(src.chunks, n, src.dim, k=c.k, nlist=nlist, pq=c.pq_m,
                                      nprobe=c.nprobe, target_recall=c.target_recall,
                                      train_x=tap.rows(0), q_ids=q_ids, xq=tap.rows(1),
                                      ondisk_dir=stage if c.ondisk else None)
        ref_x = tap.rows(2)
        del tap
        checksums = _write(fs, stage, index, c.ondisk)
        scorer = Scorer(approx_loo(faiss_ivf.search, index, c.k), self.how)
        ref, ref_d = reference_scores(scorer.score, src.chunks, n, src.ref_ids, ref_x,
                                      keep=self.width(c.k))
        return Built(checksums, ref, ref_d, scorer, info={self.key: info})

    def grow(self, g: Growing) -> tuple[Scorer, dict[str, Any]]:
        """The added rows go into the trained lists (``add_with_ids``); recall@k measured
        again at the parent's nprobe."""
        meta = g.parent[self.key]
        index = g.read_parent(faiss_ivf.INDEX_FILE)
        start = g.n_old
        for x in g.new_chunks():
            index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
            start += len(x)
        faiss_ivf.set_nprobe(index, meta["nprobe"])
        recall = g.recall(lambda xq, k: faiss_ivf.search(index, xq, k), meta["nprobe"],
                          "at_nprobe", meta["recall"])
        g.write(faiss_ivf.INDEX_FILE, index)
        return (Scorer(approx_loo(faiss_ivf.search, index, g.k), self.how),
                {self.key: {**meta, "recall": recall}})

    def load(self, files: IndexDir, *, device: str, stream_shards: bool) -> IvfSearcher:
        meta = files.manifest[self.key]
        cpu = read_ivf(files, meta)
        on_gpu = device == "cuda" and not meta["ondisk"]  # on-disk lists stay on the CPU
        return IvfSearcher(gpu.to_gpu(cpu) if on_gpu else cpu, cpu, int(files.manifest["k"]))


def _write(fs, stage: str, index: faiss.Index, ondisk: bool) -> dict[str, str]:
    """Writes ivf.faiss (its on-disk lists are already in stage); returns name -> sha256."""
    if not ondisk:
        path = outputs.join(stage, faiss_ivf.INDEX_FILE)
        return {faiss_ivf.INDEX_FILE: write_index(fs, path, index)}
    faiss.write_index(index, outputs.join(stage, faiss_ivf.INDEX_FILE))
    return {name: file_sha256(fs, outputs.join(stage, name))
            for name in (faiss_ivf.INDEX_FILE, faiss_ivf.DATA_FILE)}
