"""Index directories: the normal set as sharded faiss flat indexes plus a manifest.

Layout of INDEX_DIR:
  shard-SSSSS-of-NNNNN.faiss   IndexFlatL2 over the kept normal features
  kmeans.faiss                 IndexFlatL2 over C centroids (--kmeans C only)
  normal.parquet               uri, sha256, kept, id (row in the shards, -1 if
                               dropped by cleaning), loo_score (the normal
                               reference: a uniform sample of every normal
                               row, kept or removed, each scored against the
                               kept rows, itself left out; NaN elsewhere;
                               dn2ops.index.calibration turns scores into
                               p-values and percentiles against it),
                               clean_score (the cleaning rule's score of the
                               row, dn2ops.index.cleaning; NaN where none)
  _SUCCESS                     the manifest (JSON): backbone metadata, k,
                               counts, sha256 per file, created_at, index_id

  ivf.faiss, ivf.ivfdata        with --ivf NLIST instead of the flat shards: a
                               centred IVF-Flat / IVF-PQ index (dn2ops.index.ivf);
                               ivf.ivfdata holds its inverted lists on disk
                               (--ondisk, memory-mapped when scoring)
  hnsw.faiss                   with --hnsw M instead: an HNSW graph index
                               (dn2ops.index.hnsw), held in memory when scoring

Each kind of index (flat, kmeans, ivf, hnsw) is one class of dn2ops.index.kinds that
builds, grows (`dn2ops.index.add`) and loads its files; the faiss helpers it uses are
knn, ivf, hnsw, recall, streams and gpu.

Scores are plain Euclidean (not squared) distances, averaged over k, as in
dn2ops.score.estimator; higher = more anomalous. Flat shards give exact scores; IVF and HNSW
scores are approximate (>= exact; the manifest records recall@k).

`build_index` streams: it reads the feature shards in blocks of 8,192 rows (several
passes), grows one index shard at a time from those blocks and writes it, and computes
the leave-one-out reference scores by searching the shards it wrote, loaded one at a
time, so the whole normal set is never in memory (unless --shards 1 asks for one shard
of everything). `LoadedIndex(stream_shards=True)` scores the same way.

torch is imported before anything else in this package on purpose: torch and faiss each
bring their own libgomp, and when faiss's is loaded first, torch's OpenMP pool hangs in
forked children once the parent has run a parallel torch op (seen with faiss-cpu 1.15
and torch 2.14; tests/dn2ops/test_import_order.py). Every module that imports faiss is
in this package, so it gets torch's runtime loaded first. (Not in dn2ops/__init__: a
worker that only embeds with ONNX Runtime imports neither, and saves torch's 0.5 GB.)
"""

import torch  # noqa: F401  (before faiss: see above)

from dn2ops.index.build import build_index, build_index_from_arrays
from dn2ops.index.files import KIND, IndexError_
from dn2ops.index.kinds.kmeans import KMEANS_SAMPLE_PER_CENTROID
from dn2ops.index.reference import distances_column
from dn2ops.index.search import LoadedIndex

__all__ = ["KIND", "KMEANS_SAMPLE_PER_CENTROID", "IndexError_", "LoadedIndex", "build_index",
           "build_index_from_arrays", "distances_column"]
