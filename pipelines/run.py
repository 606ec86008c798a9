"""dn2 run --normal SRC --input SRC --output OUT_DIR: the whole nightly job in one command.

Writes OUT_DIR/normal_features, OUT_DIR/index, OUT_DIR/features and
OUT_DIR/results (the ranked table: OUT_DIR/results/anomalies-*.parquet).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines import jobs, options
from pipelines.common import guarded


def run(argv: Sequence[str] | None = None) -> int:
    args, beam_args = options.parse("run", argv)
    return guarded(lambda: jobs.run(
        normal=args.normal, input=args.input, output=args.output, k=args.k, kmeans=args.kmeans,
        clean_fraction=args.clean_fraction, shards=args.shards, partition=args.partition,
        top=args.top, max_error_fraction=args.max_error_fraction, report=args.report,
        backbone=args.backbone, weights=args.weights, batch_size=args.batch_size,
        device=args.device, max_pixels=args.max_pixels, engine=args.engine, decode=args.decode,
        threads=args.threads, decode_threads=args.decode_threads,
        max_in_flight=args.reads_in_flight,
        group_by=args.group_by, pool=args.pool, group_score=args.group_score,
        stream_shards=args.stream_shards,
        index_kwargs=dict(ivf=args.ivf, pq=args.pq, nprobe=args.nprobe,
                          target_recall=args.target_recall, ondisk=args.ondisk,
                          hnsw=args.hnsw, ef_search=args.ef_search,
                          reference_sample=args.reference_sample,
                          feature_transform=args.feature_transform,
                          clean_k=args.clean_k),
        options=options.beam_options(beam_args)), "run")
