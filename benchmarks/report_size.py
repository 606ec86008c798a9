"""Report size vs partition size: the HTML report must stay bounded.

Builds synthetic ``dn2 score`` results dirs (default 2,000 and 50,000 rows)
and prints the size of ``dn2 report``'s HTML for each. The images are the
first ``--images`` Fashion-MNIST test images (Debian package
``dataset-fashion-mnist``) written as PNGs; without that package, 28x28
Fashion-MNIST-*like* random blobs stand in. All rows reuse that pool, as a
real partition's thumbnails cost the same per image. Scores, labels and
neighbours are synthetic: only the report's size is measured.

    python benchmarks/report_size.py [--rows 2000 50000] [--out bench-out/report-size]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere (benchmarks.datasets)
    sys.path.insert(0, REPO)

from benchmarks.datasets import load_fashion_mnist, write_png_store  # noqa: E402
from dn2ops.io import outputs  # noqa: E402
from dn2ops.report import write_report  # noqa: E402

K = 5  # neighbours per row, as `dn2 score` is usually run


def image_pool(root: Path, n: int) -> list[str]:
    """n Fashion-MNIST test images as PNGs, or look-alikes when it is not installed."""
    try:
        images, _ = load_fashion_mnist(split="test")
    except FileNotFoundError:
        print("Fashion-MNIST not installed: using random look-alike images")
        return fashion_like_images(root, n)
    print(f"using the first {n} Fashion-MNIST test images")
    return write_png_store(images[:n], [f"{i:05d}" for i in range(n)], str(root))


def fashion_like_images(root: Path, n: int, seed: int = 0) -> list[str]:
    """n 28x28 grayscale PNGs: a smooth random blob on black, like a garment."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:28, 0:28]
    uris = []
    for i in range(n):
        cy, cx = rng.uniform(9, 19, 2)
        ry, rx = rng.uniform(5, 12, 2)
        blob = np.clip(1.2 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2, 0, 1)
        texture = rng.uniform(0.6, 1.0, (28, 28))
        pixels = (255 * blob * texture).astype(np.uint8)
        path = root / f"{i:05d}.png"
        Image.fromarray(pixels, mode="L").save(path)
        uris.append(str(path))
    return uris


def build_results(root: Path, n_rows: int, images: list[str], seed: int = 0) -> tuple[Path, Path]:
    """A committed results dir (4 anomaly shards, errors, summary) and an index dir."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n_rows) < 0.1).astype(np.int64)
    scores = rng.gamma(4.0, 0.25, n_rows) + labels * rng.uniform(0.3, 1.5, n_rows)
    normal = rng.gamma(4.0, 0.25, 6000)
    sorted_scores = np.sort(scores)[::-1]
    table = pa.table(
        {
            "uri": [images[i % len(images)] for i in range(n_rows)],
            "score": scores,
            "rank": np.searchsorted(-sorted_scores, -scores, side="left") + 1,
            "percentile": 100.0 * np.searchsorted(np.sort(normal), scores) / normal.size,
            "neighbor_uris": [
                [images[j % len(images)] for j in rng.integers(0, len(images), K)]
                for _ in range(n_rows)
            ],
            "neighbor_distances": np.sort(rng.random((n_rows, K)), axis=1).tolist(),
            "partition": ["bench"] * n_rows,
            "backbone": ["efficientnet_lite0"] * n_rows,
            "index_id": ["bench-index"] * n_rows,
            "sha256": ["0" * 64] * n_rows,
            "label": labels,
        }
    )
    results, index = root / "results", root / "index"
    results.mkdir(parents=True, exist_ok=True)
    index.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n_rows, 5).astype(int)
    for s in range(4):
        shard = table.slice(bounds[s], bounds[s + 1] - bounds[s])
        pq.write_table(shard, results / f"anomalies-{s:05d}-of-00004.parquet")
    # 1% of rows fail, so the errors table grows too until its 500-row cap.
    n_err = max(1, n_rows // 100)
    pq.write_table(
        pa.table(
            {
                "uri": [f"gs://bucket/bad/{i}.png" for i in range(n_err)],
                "stage": ["decode"] * n_err,
                "error": ["truncated or corrupt image data"] * n_err,
                "partition": ["bench"] * n_err,
            }
        ),
        results / "errors-00000-of-00001.parquet",
    )
    pq.write_table(
        pa.table({"uri": [f"n{i}" for i in range(normal.size)], "sha256": ["1" * 64] * normal.size,
                  "loo_score": normal, "kept": [True] * normal.size}),
        index / "normal.parquet",
    )
    summary = {
        "count_in": n_rows + n_err, "scored": n_rows, "errored": n_err, "partition": "bench",
        "backbone": "efficientnet_lite0", "index_id": "bench-index", "index_dir": str(index),
        "input": "synthetic", "errors_by_stage": {"decode": n_err},
        "timings": {"total_s": 0.0}, "created_at": "1970-01-01T00:00:00+00:00",
    }
    (results / "summary.json").write_text(json.dumps(summary))
    # Committed, as dn2 score and dn2 build-index leave them: the report reads no other.
    (results / outputs.MARKER).write_text(json.dumps({"kind": "results", **summary}))
    (index / outputs.MARKER).write_text(json.dumps({"kind": "index"}))
    return results, index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 50000])
    parser.add_argument("--images", type=int, default=500, help="distinct image files")
    parser.add_argument("--out", help="where to build (default: a temp dir, removed after)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        images = image_pool(root / "images", args.images)
        sizes = {}
        for n in args.rows:
            results, index = build_results(root / f"rows-{n}", n, images)
            t0 = time.perf_counter()
            path = write_report(str(results), index_dir=str(index))
            sizes[n] = Path(path).stat().st_size
            took = time.perf_counter() - t0
            print(f"{n:>8,} rows: {sizes[n]:>10,} bytes  ({took:.1f} s)  {path}")
        base = sizes[args.rows[0]]
        for n in args.rows[1:]:
            print(f"{n:,} vs {args.rows[0]:,} rows: {100 * (sizes[n] - base) / base:+.2f}% size")


if __name__ == "__main__":
    main()
