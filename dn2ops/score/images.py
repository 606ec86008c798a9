"""Image scoring stage: feature record batches -> anomaly record batches, ranked after.

Feature rows travel as Arrow record batches (an embedding column of float32, never
Python lists), are scored a batch at a time through Beam's RunInference with an
index model handler (the index loaded once per worker process, in load_model) and
written unranked. The global rank is a second pass over the written shards: its
only global state is the sorted array of every score (8 bytes an image), so no
scored row is held until the whole partition is scored. rank = 1 + the number of
strictly higher scores, so ties share the better rank.

Each row's ``p_value`` (against the index's normal reference) is computed with its
score; ``flagged`` in the ranking pass, from the partition's decision
(dn2ops.score.decisions: the score threshold of --fdr or --alpha), computed once from
the sorted scores and the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import RunInference

from dn2ops.config import FlagConfig, SearchConfig
from dn2ops.engines.base import Dn2ModelHandler
from dn2ops.index import LoadedIndex
from dn2ops.index.calibration import load_reference
from dn2ops.index.knn import set_faiss_threads
from dn2ops.io import features, outputs
from dn2ops.score import decisions
from dn2ops.score.heatmaps import ExplainTop

FEATURE_COLUMNS = ("uri", "sha256", "backbone", "dim", "embedding")
# Rows of an unranked shard ranked and rewritten at once (about 200 bytes a row
# without neighbours).
_RANK_BATCH = 65_536


# The hottest region of a heatmap: x0, y0, x1, y1 in the oriented image's pixels (null
# for rows without a heatmap: only the --explain top rows have one).
HOT_BOX = pa.list_(pa.int32())


def anomaly_schema(extra_columns: Sequence[str] = ()) -> pa.Schema:
    fields = [("uri", pa.string()), ("score", pa.float64()), ("rank", pa.int64()),
              ("percentile", pa.float64()), ("p_value", pa.float64()),
              ("p_value_source", pa.string()), ("flagged", pa.bool_()),
              ("neighbor_uris", pa.list_(pa.string())),
              ("neighbor_distances", pa.list_(pa.float64())), ("partition", pa.string()),
              ("backbone", pa.string()), ("index_id", pa.string()), ("sha256", pa.string()),
              ("heatmap_uri", pa.string()), ("hot_box", HOT_BOX)]
    return pa.schema(fields + [(c, pa.string()) for c in extra_columns])


def extra_columns_of(schema: pa.Schema) -> list[str]:
    """The manifest columns a feature batch carries beside FEATURE_COLUMNS."""
    return [c for c in schema.names if c not in FEATURE_COLUMNS]


def _lists(values: pa.Array, n: int, k: int) -> pa.ListArray:
    """n lists of k values each (k may be 0: K-means mode), from their n*k values."""
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k), values)


def score_batch(batch: pa.RecordBatch, index: LoadedIndex, partition: str) -> pa.RecordBatch:
    """A feature record batch (features.feature_schema) -> unranked anomaly rows
    (anomaly_schema; ``rank`` and ``flagged`` null), in the same order. Higher score =
    more anomalous; lower ``p_value`` = less like the normal set."""
    xq = features.embeddings(batch)
    if not len(xq):
        xq = np.zeros((0, index.manifest["dim"]), np.float32)
    scores, D, I = index.search(xq)
    n, k = I.shape
    extras = extra_columns_of(batch.schema)
    p, source = index.p_values(scores)
    columns = {
        "uri": batch.column("uri"), "score": pa.array(scores, pa.float64()),
        "rank": pa.nulls(n, pa.int64()),
        "percentile": pa.array(index.percentile(scores), pa.float64()),
        "p_value": pa.array(p, pa.float64()), "p_value_source": pa.array(source, pa.string()),
        "flagged": pa.nulls(n, pa.bool_()),
        "neighbor_uris": _lists(pa.array([index.uris[j] for j in I.ravel()], pa.string()),
                                n, k),
        "neighbor_distances": _lists(pa.array(D.ravel().astype(np.float64)), n, k),
        "partition": pa.array([partition] * n, pa.string()),
        "backbone": pa.array([index.manifest["backbone"]] * n, pa.string()),
        "index_id": pa.array([index.index_id] * n, pa.string()),
        "sha256": batch.column("sha256"),
        "heatmap_uri": pa.nulls(n, pa.string()), "hot_box": pa.nulls(n, HOT_BOX),
        **{c: batch.column(c).cast(pa.string()) for c in extras},
    }
    schema = anomaly_schema(extras)
    return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)


class IndexModelHandler(Dn2ModelHandler[pa.RecordBatch, pa.RecordBatch, LoadedIndex]):
    """RunInference's view of a dn2 index: feature record batch -> unranked anomaly batch.

    The index is loaded only in load_model(), once per worker process, and shared by
    its threads (RunInference's shared model), held and searched as ``search`` says.
    """

    metrics_namespace = "dn2_score"

    def __init__(self, index_dir: str, *, partition: str = "",
                 search: SearchConfig = SearchConfig(), max_batch_size: int = 1):
        # Each feature element is already a batch of rows: RunInference passes one at a
        # time. Group rows (dn2ops.score.sets) are one set each: batched here.
        super().__init__(batch_size=max_batch_size, min_batch_size=1)
        self.index_dir = index_dir
        self.partition = partition
        self.search = search

    def load_model(self) -> LoadedIndex:
        set_faiss_threads(self.search.faiss_threads)
        return LoadedIndex(self.index_dir, stream_shards=self.search.stream_shards,
                           device=self.search.device)

    def run_inference(self, batch: Sequence[pa.RecordBatch], model: LoadedIndex,
                      inference_args: dict[str, Any] | None = None) -> list[pa.RecordBatch]:
        return [score_batch(b, model, self.partition) for b in batch]


def ranks(scores: np.ndarray, sorted_scores: np.ndarray) -> np.ndarray:
    """The rank of each of ``scores`` (n,) among ``sorted_scores`` (ascending), int64 (n,):
    1 + the number of scores strictly greater (ties share the better rank)."""
    right = np.searchsorted(sorted_scores, scores, side="right")
    return (len(sorted_scores) - right + 1).astype(np.int64)


class SortedScores(beam.CombineFn):
    """Score arrays -> all of them in one ascending float64 array (8 bytes a score)."""

    def create_accumulator(self) -> list[np.ndarray]:
        return []

    def add_input(self, acc: list[np.ndarray], scores: np.ndarray) -> list[np.ndarray]:
        acc.append(np.asarray(scores, np.float64))
        if len(acc) > 64:  # one array, not thousands of small ones
            acc[:] = [np.concatenate(acc)]
        return acc

    def merge_accumulators(self, accs: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
        merged = [a for acc in accs for a in acc]
        return [np.concatenate(merged)] if merged else []

    def extract_output(self, acc: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(acc)) if acc else np.zeros(0, np.float64)


def flags(scores: np.ndarray, decision: dict[str, Any] | None) -> pa.Array | None:
    """The ``flagged`` column (n,) of scores under a partition's decision (score >=
    its threshold; none flagged when the threshold is None); None when the decision has
    no rule (rows without p-values: the column stays null)."""
    rule = (decision or {}).get("flags") or {}
    if rule.get("rule") is None:
        return None
    threshold = rule["threshold"]
    flagged = (np.zeros(len(scores), bool) if threshold is None
               else np.asarray(scores) >= threshold)
    return pa.array(flagged, pa.bool_())


def heatmap_columns(uris: pa.Array, explained: dict[str, tuple[str, list[int]]]
                    ) -> tuple[pa.Array, pa.Array]:
    """The ``heatmap_uri`` and ``hot_box`` columns of rows ``uris`` from the explain
    stage's rows (uri -> (heatmap_uri, hot_box)); null for rows it did not explain."""
    found = [explained.get(u) for u in uris.to_pylist()]
    return (pa.array([f and f[0] for f in found], pa.string()),
            pa.array([f and f[1] for f in found], HOT_BOX))


def rank_shard(src: str, dst: str, sorted_scores: np.ndarray,
               decision: dict[str, Any] | None = None, *, batch_size: int = _RANK_BATCH,
               explained: dict[str, tuple[str, list[int]]] | None = None) -> str:
    """Rewrites the unranked anomaly shard ``src`` to ``dst`` with its ``rank`` column
    filled in (see ranks), and ``flagged`` (see flags) under ``decision``
    (decisions.decide), a slice of rows at a time; with ``explained`` (the explain
    stage's rows), ``heatmap_uri`` and ``hot_box`` (heatmap_columns). Returns ``dst``.

    Writing ``dst`` whole again is harmless, so a retried step gives the same file.
    """
    fs, src_path = outputs.fs_and_path(src)
    dst_fs, dst_path = outputs.fs_and_path(dst)
    with fs.open(src_path, "rb") as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        at = schema.get_field_index("rank")
        at_flag = schema.get_field_index("flagged")
        with dst_fs.open(dst_path, "wb") as out, pq.ParquetWriter(
                out, schema, compression="none") as writer:
            for batch in pf.iter_batches(batch_size=batch_size):
                scores = batch.column("score").to_numpy(zero_copy_only=False)
                batch = batch.set_column(at, schema.field(at),
                                         pa.array(ranks(scores, sorted_scores)))
                flagged = flags(scores, decision) if at_flag >= 0 else None
                if flagged is not None:
                    batch = batch.set_column(at_flag, schema.field(at_flag), flagged)
                if explained:
                    for name, column in zip(("heatmap_uri", "hot_box"), heatmap_columns(
                            batch.column("uri"), explained), strict=True):
                        at_col = schema.get_field_index(name)
                        batch = batch.set_column(at_col, schema.field(at_col), column)
                writer.write_batch(batch)
    return dst


class RankShards(beam.DoFn):
    """An unranked shard's path -> the path of its ranked copy in ``directory``
    (rank_shard; anomaly or group shards: any table with ``score`` and ``rank``, and
    ``flagged``, filled in under the partition's decision)."""

    def __init__(self, directory: str):
        self.directory = directory

    def process(self, src: str, sorted_scores: np.ndarray,
                decision: dict[str, Any] | None = None,
                explained: dict[str, Any] | None = None) -> Iterator[str]:
        name = src.rstrip("/").rsplit("/", 1)[-1]
        yield rank_shard(src, outputs.join(self.directory, name), sorted_scores, decision,
                         explained=(explained or {}).get("rows"))


def partition_decision(sorted_scores: np.ndarray, index_dir: str, rule: FlagConfig
                       ) -> dict[str, Any]:
    """The partition's decision (decisions.decide) from its sorted scores and the
    reference of ``index_dir`` (its manifest and normal.parquet only, not its shards)."""
    return decisions.decide(sorted_scores, load_reference(index_dir), rule.rule, rule.level)


def rank_and_decide(unranked, scores, directory: str, decide, explain=None
                    ) -> tuple[Any, Any]:
    """The ranking pass of a scoring stage: unranked shard paths and score arrays ->
    (ranked shard paths, the decision singleton). ``decide(sorted_scores)`` -> decision,
    computed once. ``explain(decision)``: None, or a singleton of the explain stage's
    result (dn2ops.score.heatmaps.ExplainTop), whose rows the ranked shards carry."""
    sorted_scores = scores | "SortedScores" >> beam.CombineGlobally(SortedScores())
    decision = sorted_scores | "Decide" >> beam.Map(decide)
    side = {} if explain is None else {"explained": beam.pvalue.AsSingleton(explain(decision))}
    ranked = unranked | "Rank" >> beam.ParDo(
        RankShards(directory), sorted_scores=beam.pvalue.AsSingleton(sorted_scores),
        decision=beam.pvalue.AsSingleton(decision), **side)
    return ranked, decision


class ScoreFeatures(beam.PTransform):
    """Feature record batches -> ranked anomaly shards ``anomalies-*.parquet`` in
    ``directory``; returns (the PCollection of their paths, for finalize; the partition's
    decision, a singleton: decisions.decide under ``flags``).

    Pass 1 scores each batch and writes it unranked under ``directory/.unranked/``
    (a name the commit never copies: dn2ops.io.outputs) while the scores are combined
    into one sorted array and the decision is taken from it; pass 2, once all are
    complete, rewrites each unranked shard ranked against that array and flagged.
    Both passes are parallel over batches / shards.

    ``explain``: None, or the keywords of dn2ops.score.heatmaps.ExplainTop (backbone,
    explain, top, ...): the top rows' heatmaps are written under ``directory/heatmaps/``
    beside pass 1, and pass 2 fills their ``heatmap_uri`` and ``hot_box``; expand then
    returns a third item, the explain stage's result (a singleton, for summary.json).
    """

    def __init__(self, index_dir: str, directory: str, *, extra_columns: Sequence[str] = (),
                 partition: str = "", search: SearchConfig = SearchConfig(),
                 flags: FlagConfig = FlagConfig(), explain: dict[str, Any] | None = None):
        super().__init__()
        self.directory = directory
        self.index_dir = index_dir
        self.schema = anomaly_schema(extra_columns)
        self.handler = IndexModelHandler(index_dir, partition=partition, search=search)
        self.decide = functools.partial(partition_decision, index_dir=index_dir, rule=flags)
        self.explain = explain

    def expand(self, batches):
        scored = batches | "Score" >> RunInference(self.handler)
        unranked = (scored
                    | "AsTables" >> beam.Map(lambda b: pa.Table.from_batches([b]))
                    | "WriteUnranked" >> beam.io.WriteToParquetBatched(
                        outputs.join(self.directory, ".unranked", "anomalies"), self.schema,
                        file_name_suffix=".parquet", shard_name_template="-SSSSS-of-NNNNN"))
        scores = scored | "Scores" >> beam.Map(lambda b: b.column("score").to_numpy())
        if self.explain is None:
            return rank_and_decide(unranked, scores, self.directory, self.decide)
        explained = []

        def explain(decision):
            explained.append(scored | "Explain" >> ExplainTop(
                self.directory, decision, index_dir=self.index_dir, **self.explain))
            return explained[0]

        ranked, decision = rank_and_decide(unranked, scores, self.directory, self.decide,
                                           explain)
        return ranked, decision, explained[0]
