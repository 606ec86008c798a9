"""Growing an index (``dn2 build-index --add FEATURES_DIR --index INDEX_DIR --output NEW``):
new normal images appended to a committed index, which is left as it is.

What the new index directory holds, by the parent's kind (its ``grow``, see
dn2ops.index.kinds):

* flat (and K-means): the parent's shard files, copied byte for byte (their sha256
  checked on the way) under the new shard count, then new shards of the added rows;
  scores equal a fresh build over the union (same vectors, same exact search);
* K-means: the parent's centres are kept (``kmeans.faiss`` copied) and the drift of
  the added images is reported (their mean distance to the nearest centre against the
  parent's reference); ``retrain`` trains new centres on a sample of the union;
* IVF: the added vectors go into the trained lists (``add_with_ids``); recall@k is
  measured again at the parent's nprobe, on a sample of the union;
* HNSW: the added vectors are inserted into the graph; recall measured again at the
  parent's efSearch.

The percentile reference (``normal.parquet``'s ``loo_score``) is computed anew on a
sample of the union, as a fresh build does. Vectors of the parent that an IVF or HNSW
index does not keep exactly are read from the parent's ``features_dir`` (it must still
be readable); flat shards serve themselves. Refused: a group index, an index with
on-disk IVF lists, features from another backbone, preprocessing or weights, and images
the parent already holds (by sha256, kept or dropped by cleaning).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dn2ops.config import REFERENCE_SAMPLE
from dn2ops.index import kinds, streams
from dn2ops.index.build import feature_rows, read_chunks
from dn2ops.index.files import HASH_BLOCK, KIND, IndexDir, IndexError_, put, read_index, write_index
from dn2ops.index.knn import flat_vectors, knn_sharded
from dn2ops.index.recall import recall_at_k
from dn2ops.index.reference import ScoreFn, distances_column, reference_scores
from dn2ops.io import features, outputs

LOG = logging.getLogger("dn2")


def add_to_index(features_dir: str, index_dir: str, output: str, *, retrain: bool = False,
                 reference_sample: int | None = REFERENCE_SAMPLE,
                 device: str = "cpu", seed: int = 1234) -> dict[str, Any]:
    """Builds NEW index ``output``: the committed index ``index_dir`` plus the rows of the
    committed features directory ``features_dir``. Returns the new manifest."""
    parent = outputs.require_complete(index_dir, KIND)
    added = outputs.require_complete(features_dir, features.KIND)
    _check_addable(parent, added, index_dir, features_dir)
    outputs.check_writable(output, KIND)
    names = features.read_table(features_dir, "features", columns=["uri", "sha256"])
    normal = _read_normal(index_dir, parent)
    _refuse_known(normal, names, index_dir)
    fs, _ = outputs.fs_and_path(output)
    staging = outputs.new_staging(output)
    _, stage = outputs.fs_and_path(staging)
    fs.makedirs(stage, exist_ok=True)
    try:
        manifest = _Grow(parent, index_dir, features_dir, added, normal, names, fs, stage,
                         retrain=retrain, reference_sample=reference_sample, device=device,
                         seed=seed).build()
    except BaseException:
        outputs.discard(staging)
        raise
    outputs.commit(staging, output, manifest)
    return manifest


def _check_addable(parent: dict[str, Any], added: dict[str, Any], index_dir: str,
                   features_dir: str) -> None:
    if parent.get("group_by"):
        raise IndexError_(f"{index_dir} is a group index (--group-by): --add grows image "
                          "indexes; build the group index again")
    kinds.for_manifest(parent).check_addable(parent, index_dir)
    features.check_compatible(parent, added, f"the index {index_dir} and the added "
                              f"features {features_dir}", names=("index", "features"))
    a, b = parent.get("weights_sha256"), added.get("weights_sha256")
    if a and b and a != b:
        raise features.MetadataMismatch(
            f"the index {index_dir} was built from features of other weights (sha256 "
            f"{a[:12]}..., the added features {b[:12]}...)")


def _read_normal(index_dir: str, parent: dict[str, Any]) -> pa.Table:
    """The parent's normal.parquet, checked against its manifest's sha256."""
    fs, path = outputs.fs_and_path(outputs.join(index_dir, "normal.parquet"))
    data = fs.cat_file(path)
    if hashlib.sha256(data).hexdigest() != parent["files"]["normal.parquet"]:
        raise IndexError_(f"normal.parquet of {index_dir} does not match its manifest's "
                          "sha256: the index was changed or damaged; rebuild it")
    return pq.read_table(io.BytesIO(data))


def _refuse_known(normal: pa.Table, names: pa.Table, index_dir: str) -> None:
    """Refuses added images whose sha256 the parent already holds (kept or dropped)."""
    held = set(normal.column("sha256").to_pylist())
    again = [u for u, s in zip(names.column("uri").to_pylist(),
                               names.column("sha256").to_pylist(), strict=True) if s in held]
    if again:
        raise IndexError_(f"{len(again)} of the added images are already in {index_dir} "
                          f"(same sha256), e.g. {again[0]}; add only new images")


class _Grow:
    """One --add: the staged files of the new index and its manifest (the parent's kind
    grows its files: a dn2ops.index.kinds.Growing)."""

    def __init__(self, parent, index_dir, features_dir, added, normal, names, fs, stage, *,
                 retrain, reference_sample, device, seed):
        self.parent, self.index_dir, self.features_dir = parent, index_dir, features_dir
        self.parent_dir = IndexDir(index_dir, parent)
        self.kind = kinds.for_manifest(parent)
        self.added, self.normal, self.names = added, normal, names
        self.fs, self.stage = fs, stage
        self.retrain, self.device, self.seed = retrain, device, seed
        self.reference_sample = reference_sample
        self.dim = int(parent["dim"])
        self.transform = parent.get("feature_transform") or "none"
        self.k = int(parent["k"])
        self.n_old = int(parent["counts"]["kept"])
        self.per_shard = feature_rows(features_dir)
        self.m = int(sum(self.per_shard))
        self.n = self.n_old + self.m
        self.files: dict[str, str] = {}
        self.flat_names: list[str] = []  # the staged flat shards, once written
        self.n_parent_shards = 0  # the first of them, copied from the parent

    def new_chunks(self) -> Iterator[np.ndarray]:
        return read_chunks(self.features_dir, self.dim, transform=self.transform)

    def old_chunks(self) -> Iterator[np.ndarray]:
        """The parent's kept vectors, transformed, in id order, read from its features
        directory (an IVF or HNSW index does not keep them exactly)."""
        source = self.parent.get("features_dir")
        if not source or outputs.read_marker(source) is None:
            raise IndexError_(
                f"the parent index's features ({source}) are not readable: --add reads "
                "an IVF or HNSW index's vectors from there (for the percentile reference "
                "and recall)")
        kept = self.normal.column("kept").to_numpy(zero_copy_only=False)
        yield from read_chunks(source, self.dim, None if kept.all() else kept, self.transform)

    def union(self) -> Iterator[np.ndarray]:
        """Every vector of the new index, in id order (the parent's, then the added)."""
        if self.flat_names:
            yield from self._staged_vectors(self.flat_names)
            return
        yield from self.old_chunks()
        yield from self.new_chunks()

    def _staged_vectors(self, names: list[str]) -> Iterator[np.ndarray]:
        """The vectors of staged flat shards, one shard at a time (sha256 checked)."""
        for name in names:
            index = read_index(self.fs, outputs.join(self.stage, name), name, self.files[name])
            x = flat_vectors(index).copy()
            del index
            yield x

    def build(self) -> dict[str, Any]:
        if self.m == 0:
            raise IndexError_(f"{self.features_dir} holds no feature rows: nothing to add")
        if self.parent.get("clean_fraction"):
            LOG.warning("the parent index was cleaned (--clean-fraction %s); the added images "
                        "are not: build anew to clean the union", self.parent["clean_fraction"])
        score, info = self.kind.grow(self)
        ref, ref_d, incremental = self._reference(score, self.kind.width(self.k))
        self._write_normal(ref, ref_d)
        return self._manifest(info, ref, incremental)

    def _reference(self, score: ScoreFn, width: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(scores (n,), distances (n, width), incremental) of a uniform sample of the union.

        Incremental when the parent kept its sample's neighbour distances
        (``loo_distances``): the part of its sample that a sample of the union keeps is
        merged with the distances to the added rows (unchanged, with K-means centres kept),
        and only a proportional sample of the added rows is searched against everything:
        O(m) work, where a fresh reference costs O(sample x n).
        """
        old_ids, old_d = self._parent_sample(width)
        size = self.n if self.reference_sample is None else min(self.reference_sample, self.n)
        # A parent sampled more thinly than the union asks for (or not at all) cannot be
        # thinned to a uniform sample of the union: that reference is computed afresh.
        fresh = (old_ids is None or not self.kind.reference_reusable(self.retrain)
                 or len(old_ids) / self.n_old < size / self.n)
        if fresh:
            ids = None if size >= self.n else streams.sample_ids(self.n, size, self.seed + 2)
            return (*reference_scores(score, self.union, self.n, ids, keep=width), False)
        rng = np.random.default_rng(self.seed + 2)
        keep = min(round(size * self.n_old / self.n), len(old_ids))  # the union's rate
        pick = np.sort(rng.choice(len(old_ids), size=keep, replace=False))
        old_ids, old_d = old_ids[pick], old_d[pick]
        if self.kind.neighbours:  # the added rows may be nearer neighbours
            xq = streams.gather_rows(self.old_chunks_of_union(), old_ids)
            D_add, _ = knn_sharded(xq, self.new_chunks(), self.k)
            old_d = np.sort(np.concatenate([old_d, D_add], axis=1), axis=1)[:, :self.k]
        new_ids = self.n_old + streams.sample_ids(self.m, round(size * self.m / self.n),
                                                  self.seed + 3)
        xq = streams.gather_rows(self.new_chunks(), new_ids - self.n_old)
        ref, ref_d = reference_scores(score, self.union, self.n, new_ids, xq, keep=width)
        ref[old_ids] = old_d.mean(axis=1, dtype=np.float64)
        ref_d[old_ids] = old_d
        return ref, ref_d, True

    def _parent_sample(self, width: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(ids, neighbour distances) of the parent's reference sample, or (None, None) when
        its normal.parquet predates ``loo_distances``."""
        if "loo_distances" not in self.normal.column_names:
            return None, None
        kept = self.normal.column("kept").to_numpy(zero_copy_only=False)
        col = self.normal.column("loo_distances").combine_chunks()
        sampled = kept & ~col.is_null().to_numpy(zero_copy_only=False)
        ids = self.normal.column("id").to_numpy()[sampled]
        D = (col.filter(pa.array(sampled)).flatten().to_numpy(zero_copy_only=False)
             .reshape(-1, width))
        order = np.argsort(ids)
        return ids[order].astype(np.int64), D[order].astype(np.float32)

    def old_chunks_of_union(self) -> Iterator[np.ndarray]:
        """The parent's vectors, read where union() reads them (its copied shards, when
        flat: the added shards are not read)."""
        if self.flat_names:
            return self._staged_vectors(self.flat_names[:self.n_parent_shards])
        return self.old_chunks()

    def copy(self, name: str, dst: str) -> None:
        """Copies a parent file into the staging folder, checking its sha256 on the way."""
        src_fs, src = outputs.fs_and_path(outputs.join(self.index_dir, name))
        h = hashlib.sha256()
        with src_fs.open(src, "rb") as f, self.fs.open(outputs.join(self.stage, dst),
                                                       "wb") as out:
            while block := f.read(HASH_BLOCK):
                h.update(block)
                out.write(block)
        if h.hexdigest() != self.parent["files"][name]:
            raise IndexError_(f"index file {name} of {self.index_dir} does not match its "
                              "manifest's sha256: the parent was changed or damaged")
        self.files[dst] = h.hexdigest()

    def write(self, name: str, index: faiss.Index) -> None:
        """Writes ``index`` into the staging folder as ``name``."""
        self.files[name] = write_index(self.fs, outputs.join(self.stage, name), index)

    def read_parent(self, name: str) -> faiss.Index:
        """A parent index file, sha256 checked, holding the parent's n_old vectors."""
        fs, path = outputs.fs_and_path(outputs.join(self.index_dir, name))
        index = read_index(fs, path, name, self.parent["files"][name])
        if index.ntotal != self.n_old:
            raise IndexError_(f"{name} of {self.index_dir} holds {index.ntotal} vectors, its "
                              f"manifest says {self.n_old}")
        return index

    def recall(self, search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
               effort: int, key: str, before: dict[str, Any]) -> dict[str, Any]:
        """recall@k at the parent's search effort, on a uniform sample of the union."""
        q_ids = streams.sample_ids(self.n, int(before["queries"]), self.seed + 1)
        xq = streams.gather_rows(self.union(), q_ids)
        De, Ie = knn_sharded(xq, self.union(), self.k + 1)
        _, Ie = streams.drop_self(De, Ie, q_ids)
        Da, Ia = search(xq, self.k + 1)
        got = recall_at_k(streams.drop_self(Da, Ia, q_ids)[1], Ie)
        return {**before, key: {str(effort): round(got, 4)}, "recall_at_k": round(got, 4),
                "target_reached": bool(got >= before["target"]),
                "parent_recall_at_k": before["recall_at_k"]}

    def _write_normal(self, ref: np.ndarray, ref_d: np.ndarray) -> None:
        old = self.normal
        kept = old.column("kept").to_numpy(zero_copy_only=False)
        old_ids = old.column("id").to_numpy()
        loo = np.full(len(old) + self.m, np.nan)
        loo[np.flatnonzero(kept)] = ref[old_ids[kept]]
        loo[len(old):] = ref[self.n_old:]
        loo_d = np.full((len(old) + self.m, ref_d.shape[1]), np.nan, np.float32)
        loo_d[np.flatnonzero(kept)] = ref_d[old_ids[kept]]
        loo_d[len(old):] = ref_d[self.n_old:]
        table = pa.table({
            "uri": pa.concat_arrays([old.column("uri").combine_chunks(),
                                     self.names.column("uri").combine_chunks()]),
            "sha256": pa.concat_arrays([old.column("sha256").combine_chunks(),
                                        self.names.column("sha256").combine_chunks()]),
            "kept": pa.array(np.concatenate([kept, np.ones(self.m, bool)])),
            "id": pa.array(np.concatenate([old_ids, np.arange(self.n_old, self.n)])),
            "loo_score": pa.array(loo), "loo_distances": distances_column(loo_d)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.files["normal.parquet"] = put(self.fs, outputs.join(self.stage, "normal.parquet"),
                                            buf.getvalue())

    def _manifest(self, info: dict[str, Any], ref: np.ndarray, incremental: bool
                  ) -> dict[str, Any]:
        files = dict(sorted(self.files.items()))
        counts = self.parent["counts"]
        scored = int(np.isfinite(ref).sum())
        sample = None if scored == self.n else scored
        reference = {**self.parent["reference"], "scores": scored, "sample": sample,
                     "of": self.n, "incremental": incremental,
                     "percentile_error": round(streams.percentile_error(sample), 3)}
        return {
            **self.parent, **info,
            "counts": {"normal_in": counts["normal_in"] + self.m, "kept": self.n,
                       "dropped": counts["dropped"]},
            "reference": reference, "files": files,
            "weights_sha256": self.parent.get("weights_sha256")
            or self.added.get("weights_sha256"),
            "added": {"features_dir": self.features_dir, "images": self.m,
                      "parent": self.index_dir},
            "parent_index_id": self.parent["index_id"],
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "index_id": hashlib.sha256("".join(files.values()).encode()).hexdigest()[:16],
        }

