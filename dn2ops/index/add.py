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

The added images are cleaned as the parent was (dn2ops.index.cleaning): when the parent
used the auto rule, each added row is scored against a uniform sample of the parent's kept
rows (the parent's k_s scaled to the sample) and goes when its score is above the parent's
recorded threshold (at most half of the added rows go; ``clean=False``, ``--no-clean``:
none). A parent cleaned by a fraction, or not at all, leaves the added rows as they are
(the manifest's ``cleaning.added`` says so, and why).

The normal reference (``normal.parquet``'s ``loo_score``) is a uniform sample of every
normal row of the union, kept or removed by cleaning, as a fresh build's (K-means: out of
the centres' training sample); its tail is fitted again. Removed rows are read from the
features they came from (a parent's that are no longer readable leave the reference, and
the manifest's ``reference.includes_removed`` is false). Vectors of the parent that an IVF or HNSW
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

from dn2ops.config import CLEAN_SAMPLE, REFERENCE_SAMPLE, clean_rule
from dn2ops.index import cleaning, kinds, streams
from dn2ops.index.build import feature_rows, read_chunks
from dn2ops.index.calibration import fit_tail, tail_entry
from dn2ops.index.files import HASH_BLOCK, KIND, IndexDir, IndexError_, put, read_index, write_index
from dn2ops.index.knn import flat_vectors, knn_sharded
from dn2ops.index.recall import recall_at_k
from dn2ops.index.reference import Scorer, distances_column, outside_scores, reference_scores
from dn2ops.io import features, outputs

LOG = logging.getLogger("dn2")


def add_to_index(features_dir: str, index_dir: str, output: str, *, retrain: bool = False,
                 reference_sample: int | None = REFERENCE_SAMPLE,
                 device: str = "cpu", seed: int = 1234, clean: bool = True) -> dict[str, Any]:
    """Builds NEW index ``output``: the committed index ``index_dir`` plus the rows of the
    committed features directory ``features_dir``. ``clean``: remove added rows by the
    parent's auto cleaning rule, when it used one. Returns the new manifest."""
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
                         seed=seed, clean=clean).build()
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
                 retrain, reference_sample, device, seed, clean=True):
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
        self.clean = clean
        self.m_in = self.m  # the added rows, before cleaning
        self.added_kept: np.ndarray | None = None  # (m_in,) bool, once cleaned
        self.cleaned = cleaning.off(self.m)
        self.files: dict[str, str] = {}
        self.flat_names: list[str] = []  # the staged flat shards, once written
        self.n_parent_shards = 0  # the first of them, copied from the parent

    def new_chunks(self) -> Iterator[np.ndarray]:
        """The added rows that cleaning kept, transformed as the parent's were."""
        return read_chunks(self.features_dir, self.dim, self.added_kept, self.transform)

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
        self._clean_added()
        scorer, info = self.kind.grow(self)
        loo, loo_d, flags = self._reference(scorer, self.kind.width(self.k))
        self._write_normal(loo, loo_d)
        return self._manifest(info, loo, {**flags, "how": scorer.how})

    def _clean_added(self) -> None:
        """Cleans the added rows as the parent was (self.cleaned); the rows kept become the
        added rows (added_kept, m, n, per_shard)."""
        why = self._why_not_cleaned()
        if why is not None:
            if why[0] == "not applied":
                LOG.warning("the added images are not cleaned: %s", why[1])
            self.cleaned = cleaning.Cleaned(np.ones(self.m, bool), np.full(self.m, np.nan),
                                            {"rule": why[0], "removed": 0, "of": self.m,
                                             "why": why[1]})
            return
        self.cleaned = self._auto_added(self.parent["cleaning"])
        kept = self.cleaned.kept
        if not kept.all():
            bounds = np.cumsum([0] + self.per_shard)
            self.per_shard = [int(kept[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:],
                                                                   strict=True)]
            self.added_kept, self.m = kept, int(kept.sum())
            self.n = self.n_old + self.m

    def _why_not_cleaned(self) -> tuple[str, str] | None:
        """(rule, why) when the added rows are not cleaned; None when the parent's auto rule
        applies to them."""
        parent = _parent_cleaning(self.parent)
        rule = parent["rule"]
        if not self.clean:
            return "off", "--no-clean: the added images are kept as they are"
        if rule == "auto" and parent.get("threshold") is not None:
            return None
        if rule == "auto":
            return "not applied", ("the parent's cleaning scores had no spread (no threshold "
                                   "recorded), so no added image can be called far")
        if rule == "fraction":
            return "not applied", (f"the parent was cleaned by --clean-fraction "
                                   f"{self.parent.get('clean_fraction')}, which removes a share "
                                   "of a whole set: build anew to clean the union")
        return "off", f"the parent index was not cleaned (rule {rule})"

    def _auto_added(self, parent: dict[str, Any]) -> cleaning.Cleaned:
        """The parent's auto rule on the added rows: each one's score (m,) against a uniform
        sample of the parent's kept rows, with the parent's k_s scaled to that sample (the
        same share of neighbours), compared with the parent's threshold; at most half go."""
        m_s = min(self.n_old, parent.get("sample") or CLEAN_SAMPLE)
        k_s = max(1, min(round(parent["k_s"] * m_s / parent["sample_kept"]), m_s))
        ids = streams.sample_ids(self.n_old, m_s, self.seed + 5)
        x = streams.gather_rows(self._parent_vectors(), ids)
        scores = cleaning.score_rows(
            read_chunks(self.features_dir, self.dim, transform=self.transform), x, k_s)
        kept = cleaning.over_threshold(scores, parent["threshold"], self.m // 2)
        removed = int((~kept).sum())
        LOG.info("cleaning (auto, the parent's threshold): %s of the %s added images removed",
                 removed, self.m)
        return cleaning.Cleaned(kept, scores, {
            "rule": "auto", "estimated_rate": round(removed / self.m, 6), "removed": removed,
            "of": self.m, "threshold": parent["threshold"], "sample": m_s, "k_s": k_s,
            "against": "a sample of the parent's kept rows"})

    def _parent_vectors(self) -> Iterator[np.ndarray]:
        """The parent's kept vectors in id order: from its flat shards (sha256 checked) when
        it has them, else from its features directory (old_chunks)."""
        names = sorted(name for name in self.parent["files"] if name.startswith("shard-"))
        if not names:
            yield from self.old_chunks()
            return
        for name in names:
            fs, path = outputs.fs_and_path(outputs.join(self.index_dir, name))
            index = read_index(fs, path, name, self.parent["files"][name])
            x = flat_vectors(index).copy()
            del index
            yield x

    def _all_ids(self) -> np.ndarray:
        """Each normal row's id in the new index (A,) int64, -1 where cleaning removed it:
        the parent's rows, then every added row (normal.parquet's order)."""
        added_ids = np.full(self.m_in, -1, np.int64)
        added_ids[self.cleaned.kept] = np.arange(self.n_old, self.n)
        return np.concatenate([self.normal.column("id").to_numpy(), added_ids])

    def _reference(self, scorer: Scorer, width: int
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, bool]]:
        """loo_score (A,) and loo_distances (A, width) of a uniform sample of every normal
        row (the parent's and the added, kept or removed by cleaning; NaN elsewhere), and
        {incremental, includes_removed}.

        Incremental when the parent kept its sample's neighbour distances
        (``loo_distances``): the part of its sample that a sample of the union keeps is
        merged with the distances to the added rows, and only a proportional sample of the
        added rows is searched against everything: O(m) work, where a fresh reference
        costs O(sample x n). Sampled removed rows are scored as new images would be.
        """
        ids_all = self._all_ids()
        A = len(ids_all)
        size = A if self.reference_sample is None else min(self.reference_sample, A)
        old_rows, old_d = self._parent_sample(width)
        # A parent sampled more thinly than the union asks for (or not at all) cannot be
        # thinned to a uniform sample of the union: that reference is computed afresh.
        fresh = (old_rows is None or not self.kind.reference_reusable(self.retrain)
                 or len(old_rows) / len(self.normal) < size / A)
        loo, loo_d = np.full(A, np.nan), np.full((A, width), np.nan, np.float32)
        if fresh:
            rows = None if size >= A else streams.sample_ids(A, size, self.seed + 2)
            picked = np.arange(A) if rows is None else rows
            kept_rows, removed = picked[ids_all[picked] >= 0], picked[ids_all[picked] < 0]
            ids = ids_all[kept_rows]
            ref, ref_d = reference_scores(scorer.score, self.union, self.n,
                                          None if rows is None else ids, keep=width)
            loo[kept_rows], loo_d[kept_rows] = ref[ids], ref_d[ids]
        else:
            removed = self._incremental(scorer, old_rows, old_d, ids_all, size, loo, loo_d)
        complete = self._score_outside(scorer, removed, loo, loo_d)
        return loo, loo_d, {"incremental": not fresh, "includes_removed": complete}

    def _incremental(self, scorer: Scorer, old_rows: np.ndarray, old_d: np.ndarray,
                     ids_all: np.ndarray, size: int, loo: np.ndarray, loo_d: np.ndarray
                     ) -> np.ndarray:
        """Fills loo, loo_d (A,...) with the parent's sample thinned to the union's rate (its
        kept rows' distances merged with those to the added rows) and a proportional
        sample of the added rows; returns the sampled rows removed by cleaning."""
        P, A = len(self.normal), len(ids_all)
        rng = np.random.default_rng(self.seed + 2)
        keep = min(round(size * P / A), len(old_rows))  # the union's rate
        pick = np.sort(rng.choice(len(old_rows), size=keep, replace=False))
        old_rows, old_d = old_rows[pick], old_d[pick]
        is_kept = ids_all[old_rows] >= 0
        kept_rows, old_d = old_rows[is_kept], old_d[is_kept]
        if self.kind.neighbours and len(kept_rows):  # the added rows may be nearer neighbours
            xq = streams.gather_rows(self.old_chunks_of_union(), ids_all[kept_rows])
            D_add, _ = knn_sharded(xq, self.new_chunks(), self.k)
            old_d = np.sort(np.concatenate([old_d, D_add], axis=1), axis=1)[:, :self.k]
        loo[kept_rows], loo_d[kept_rows] = old_d.mean(axis=1, dtype=np.float64), old_d
        new_rows = P + streams.sample_ids(self.m_in, round(size * self.m_in / A),
                                          self.seed + 3)
        new_kept = new_rows[ids_all[new_rows] >= 0]
        new_ids = ids_all[new_kept]
        xq = streams.gather_rows(self.new_chunks(), new_ids - self.n_old)
        ref, ref_d = reference_scores(scorer.score, self.union, self.n, new_ids, xq,
                                      keep=loo_d.shape[1])
        loo[new_kept], loo_d[new_kept] = ref[new_ids], ref_d[new_ids]
        return np.concatenate([old_rows[~is_kept], new_rows[ids_all[new_rows] < 0]])

    def _score_outside(self, scorer: Scorer, rows: np.ndarray, loo: np.ndarray,
                       loo_d: np.ndarray) -> bool:
        """Scores the sampled removed rows (positions among all A rows; at the scorer's
        share) against the new index as new images, into loo, loo_d. False when some
        could not be read (a parent's removed rows outside its readable features_dir):
        those stay out of the reference."""
        if scorer.share < 1:
            rows = rows[streams.sample_ids(len(rows), round(scorer.share * len(rows)),
                                           self.seed + 4)]
        rows = np.sort(rows)
        P = len(self.normal)
        source = self.parent.get("features_dir")
        F = (sum(feature_rows(source)) if (rows < P).any() and source
             and outputs.read_marker(source) is not None else 0)
        ok = rows[(rows >= P) | (rows < F)]
        if len(ok) < len(rows):
            LOG.warning("%s of the reference's images removed by cleaning are left out of "
                        "it: the parent's features (%s) are not readable", len(rows) - len(ok),
                        source)
        if len(ok):
            loo[ok], loo_d[ok] = outside_scores(scorer.score, self._rows_of(ok, source),
                                                len(ok), loo_d.shape[1])
        return len(ok) == len(rows)

    def _rows_of(self, rows: np.ndarray, source: str | None) -> Iterator[np.ndarray]:
        """The vectors of normal rows (sorted positions among all rows), transformed: the
        parent's from its features directory, the added ones from theirs."""
        P = len(self.normal)
        for directory, at, size in ((source, rows[rows < P], P),
                                    (self.features_dir, rows[rows >= P] - P, self.m_in)):
            if len(at):
                mask = np.zeros(size, bool)
                mask[at] = True
                yield from read_chunks(directory, self.dim, mask, self.transform)

    def _parent_sample(self, width: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(rows, neighbour distances) of the parent's reference sample (its rows in
        normal.parquet), or (None, None) when its normal.parquet predates
        ``loo_distances`` or its reference left out the rows cleaning removed."""
        if "loo_distances" not in self.normal.column_names:
            return None, None
        kept = self.normal.column("kept").to_numpy(zero_copy_only=False)
        if not kept.all() and not (self.parent.get("reference") or {}).get("includes_removed"):
            return None, None
        col = self.normal.column("loo_distances").combine_chunks()
        sampled = ~col.is_null().to_numpy(zero_copy_only=False)
        D = (col.filter(pa.array(sampled)).flatten().to_numpy(zero_copy_only=False)
             .reshape(-1, width))
        return np.flatnonzero(sampled).astype(np.int64), D.astype(np.float32)

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

    def _write_normal(self, loo: np.ndarray, loo_d: np.ndarray) -> None:
        """normal.parquet: the parent's rows, then every added row (kept or removed by
        cleaning: kept false, id -1), with the reference scores loo (A,) and distances
        loo_d (A, k') of the new index."""
        old = self.normal
        kept = old.column("kept").to_numpy(zero_copy_only=False)
        added_kept = self.cleaned.kept
        table = pa.table({
            "uri": pa.concat_arrays([old.column("uri").combine_chunks(),
                                     self.names.column("uri").combine_chunks()]),
            "sha256": pa.concat_arrays([old.column("sha256").combine_chunks(),
                                        self.names.column("sha256").combine_chunks()]),
            "kept": pa.array(np.concatenate([kept, added_kept])),
            "id": pa.array(self._all_ids()),
            "loo_score": pa.array(loo), "loo_distances": distances_column(loo_d),
            "clean_score": pa.array(np.concatenate([_clean_scores(old), self.cleaned.scores]),
                                    pa.float64())})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.files["normal.parquet"] = put(self.fs, outputs.join(self.stage, "normal.parquet"),
                                            buf.getvalue())

    def _manifest(self, info: dict[str, Any], loo: np.ndarray, how: dict[str, Any]
                  ) -> dict[str, Any]:
        files = dict(sorted(self.files.items()))
        counts = self.parent["counts"]
        scored = int(np.isfinite(loo).sum())
        sample = None if scored == len(loo) else scored
        reference = {**self.parent["reference"], "scores": scored, "sample": sample,
                     "of": len(loo), **how,
                     "percentile_error": round(streams.percentile_error(sample), 3),
                     "tail": tail_entry(fit_tail(loo))}
        return {
            **self.parent, **info,
            "counts": {"normal_in": counts["normal_in"] + self.m_in, "kept": self.n,
                       "dropped": counts["dropped"] + self.m_in - self.m},
            "cleaning": {**_parent_cleaning(self.parent), "added": self.cleaned.entry},
            "reference": reference, "files": files,
            "weights_sha256": self.parent.get("weights_sha256")
            or self.added.get("weights_sha256"),
            "added": {"features_dir": self.features_dir, "images": self.m,
                      "parent": self.index_dir},
            "parent_index_id": self.parent["index_id"],
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "index_id": hashlib.sha256("".join(files.values()).encode()).hexdigest()[:16],
        }



def _parent_cleaning(parent: dict[str, Any]) -> dict[str, Any]:
    """The parent's ``cleaning`` entry (one for indexes built before it was recorded),
    without the entry of an earlier --add."""
    entry = parent.get("cleaning") or {
        "rule": clean_rule(parent.get("clean_fraction") or 0.0),
        "removed": parent["counts"]["dropped"], "of": parent["counts"]["normal_in"]}
    return {key: value for key, value in entry.items() if key != "added"}


def _clean_scores(normal: pa.Table) -> np.ndarray:
    """normal.parquet's clean_score (n,) float64; NaN for a table written before it."""
    if "clean_score" not in normal.column_names:
        return np.full(len(normal), np.nan)
    return normal.column("clean_score").to_numpy(zero_copy_only=False).astype(np.float64)
