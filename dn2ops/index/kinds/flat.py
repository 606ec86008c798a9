"""The flat kind (the default): exact search over IndexFlatL2 shards of the kept normal
rows, ``shard-SSSSS-of-NNNNN.faiss``; the reference is the exact leave-one-out score."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dn2ops.config import IndexConfig
from dn2ops.index import gpu, streams
from dn2ops.index.files import IndexDir, flat_of, shard_name
from dn2ops.index.kinds.base import Built, Growing, IndexKind, NeighbourSearcher, Source
from dn2ops.index.knn import ExactShard, FlatShard, knn_sharded
from dn2ops.index.reference import ScoreFn, Scorer, flat_loo, reference_scores
from dn2ops.index.shards import shard_loader, shard_sizes, write_flat_shards


def write_shards(fs, stage: str, src: Source, c: IndexConfig, *id_sets: np.ndarray | None
                 ) -> tuple[dict[str, str], int, list[np.ndarray | None]]:
    """Writes the flat shards of ``src`` (``c.shards`` of them, or one per feature shard)
    in one pass that also gathers the reference rows and those of ``id_sets``. Returns
    (name -> sha256, the number of shards, [reference rows, rows of each id set])."""
    sizes = shard_sizes(src.n, c.shards, src.kept_per_shard)
    tap = streams.Tap(src.chunks(), src.ref_ids, *id_sets)
    checksums = write_flat_shards(fs, stage, tap, sizes)
    return checksums, len(sizes), [tap.rows(i) for i in range(1 + len(id_sets))]


def grow_shards(g: Growing) -> tuple[ScoreFn, dict[str, Any]]:
    """The parent's shards copied (byte for byte, under the new shard count) and new
    shards of the added rows written after them; the exact leave-one-out score over all."""
    old = g.parent_dir.shard_names
    sizes = shard_sizes(g.m, None, g.per_shard)
    total = len(old) + len(sizes)
    renamed = [shard_name(i, total) for i in range(total)]
    for src, dst in zip(old, renamed, strict=False):
        g.copy(src, dst)
    # Written under their final names: an object store has no cheap rename.
    for name, xb in zip(renamed[len(old):], streams.rechunk(g.new_chunks(), sizes),
                        strict=True):
        g.write(name, flat_of(xb))
    g.flat_names, g.n_parent_shards = renamed, len(old)
    load = shard_loader(g.fs, g.stage, renamed, g.device)
    return flat_loo(load, g.k, g.device), {"shards": total}


class FlatSearcher(NeighbourSearcher):
    """Exact k-NN over the flat shards, merged exactly: held in memory (each the faiss
    index read from its file, shifted in place: one copy), or with ``stream_shards``
    loaded one at a time for each query batch (indexes larger than memory; every load
    checks the shard's sha256 again). On 'cuda' each shard is put on the GPU
    (dn2ops.index.gpu.GpuFlat)."""

    def __init__(self, files: IndexDir, k: int, *, device: str, stream_shards: bool):
        self.files, self.k, self.device = files, k, device
        self.held: list[ExactShard] = []
        if stream_shards:
            for name in files.shard_names:  # fail before any heavy work; loads check again
                files.check_flat(name)
                if files.verify:
                    files.check_file(name)
        else:  # built once, searched for every query batch
            self.held = list(self.load())

    def load(self) -> Iterator[ExactShard]:
        """Each flat shard, loaded for search."""
        if self.device == "cuda":
            for xb in self.files.iter_shards():
                yield gpu.GpuFlat(xb)
            return
        for name in self.files.shard_names:
            yield FlatShard.adopt(self.files.read_flat(name))

    def neighbours(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return knn_sharded(xq, self.held or self.load(), self.k)


class Flat(IndexKind):
    """Exact flat shards: what any config asks for that asks for no other kind."""

    name = "flat"
    how = "leave-one-out, exact"

    def wanted(self, config: IndexConfig) -> bool:
        return True

    def recorded(self, manifest: dict[str, Any]) -> bool:
        return True

    def build(self, fs, stage: str, src: Source, c: IndexConfig, device: str) -> Built:
        """Flat shards, written as the rows stream by."""
        checksums, n_flat, (ref_x,) = write_shards(fs, stage, src, c)
        load = shard_loader(fs, stage, sorted(checksums), device)
        scorer = Scorer(flat_loo(load, c.k, device), self.how)
        ref, ref_d = reference_scores(scorer.score, src.chunks, src.n, src.ref_ids, ref_x,
                                      keep=self.width(c.k))
        return Built(checksums, ref, ref_d, scorer, n_flat=n_flat)

    def grow(self, g: Growing) -> tuple[Scorer, dict[str, Any]]:
        score, info = grow_shards(g)
        return Scorer(score, self.how), info

    def load(self, files: IndexDir, *, device: str, stream_shards: bool) -> FlatSearcher:
        return FlatSearcher(files, int(files.manifest["k"]), device=device,
                            stream_shards=stream_shards)
