"""The HNSW kind (``--hnsw M``): a faiss IndexHNSWFlat graph, ``hnsw.faiss``, held in
memory; efSearch tuned for recall@k (dn2ops.index.hnsw). Scores are approximate
(>= exact)."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from dn2ops.config import IndexConfig
from dn2ops.index import hnsw as faiss_hnsw
from dn2ops.index import streams
from dn2ops.index.files import IndexDir, write_index
from dn2ops.index.kinds.base import ApproximateKind, Built, Growing, NeighbourSearcher, Source
from dn2ops.index.reference import Scorer, approx_loo, reference_scores
from dn2ops.io import outputs


class HnswSearcher(NeighbourSearcher):
    """Approximate k-NN over the graph ``index``, on the CPU (faiss has no GPU HNSW)."""

    def __init__(self, index: faiss.Index, k: int):
        self.index, self.k = index, k

    def neighbours(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return faiss_hnsw.search(self.index, xq, self.k)


class Hnsw(ApproximateKind):
    """An HNSW graph, searched at the efSearch the build measured."""

    name = key = "hnsw"
    how = "leave-one-out, HNSW (approximate)"
    effort = "ef_search"

    def wanted(self, config: IndexConfig) -> bool:
        return config.hnsw_m is not None

    def build(self, fs, stage: str, src: Source, c: IndexConfig, device: str) -> Built:
        """hnsw.faiss; efSearch measured against the target."""
        q_ids = streams.sample_ids(src.n, c.recall_queries, c.seed + 1)
        tap = streams.Tap(src.chunks(), q_ids, src.ref_ids)
        for _ in tap:
            pass
        index, info = faiss_hnsw.build(src.chunks, src.n, src.dim, k=c.k, m=c.hnsw_m,
                                       q_ids=q_ids, xq=tap.rows(0), ef_search=c.ef_search,
                                       target_recall=c.target_recall)
        ref_x = tap.rows(1)
        del tap
        path = outputs.join(stage, faiss_hnsw.INDEX_FILE)
        checksums = {faiss_hnsw.INDEX_FILE: write_index(fs, path, index)}
        scorer = Scorer(approx_loo(faiss_hnsw.search, index, c.k), self.how)
        ref, ref_d = reference_scores(scorer.score, src.chunks, src.n, src.ref_ids, ref_x,
                                      keep=self.width(c.k))
        return Built(checksums, ref, ref_d, scorer, info={self.key: info})

    def grow(self, g: Growing) -> tuple[Scorer, dict[str, Any]]:
        """The added rows inserted into the graph; recall@k measured again at the parent's
        efSearch."""
        meta = g.parent[self.key]
        index = g.read_parent(faiss_hnsw.INDEX_FILE)
        for x in g.new_chunks():
            index.add(x)
        faiss_hnsw.set_ef(index, meta["ef_search"])
        recall = g.recall(lambda xq, k: faiss_hnsw.search(index, xq, k), meta["ef_search"],
                          "at_ef_search", meta["recall"])
        g.write(faiss_hnsw.INDEX_FILE, index)
        return (Scorer(approx_loo(faiss_hnsw.search, index, g.k), self.how),
                {self.key: {**meta, "recall": recall}})

    def load(self, files: IndexDir, *, device: str, stream_shards: bool) -> HnswSearcher:
        index = files.read_checked(faiss_hnsw.INDEX_FILE)
        faiss_hnsw.set_ef(index, files.manifest[self.key]["ef_search"])
        return HnswSearcher(index, int(files.manifest["k"]))
