"""Shared fixtures: small real image stores (scikit-learn's 8x8 handwritten digits),
synthetic committed results directories, headless Chromium, and real object-store servers
(tests/objectstores.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

# gcsfs reads this when imported: its experimental zonal-bucket support probes GCS over
# gRPC, which an emulator lacks (60 s a call). Tests never reach the real GCS.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from benchmarks.datasets import write_manifest, write_png_store  # noqa: E402
from dn2ops.io import (
    features,  # noqa: E402
    outputs,
)
from tests.objectstores import FakeGcs, MotoS3, fake_gcs_compatible  # noqa: E402


def digit_images(n_normal: int = 24, n_incoming: int = 30, normal_digit: int = 0):
    """(normal uint8 (n,32,32), incoming uint8 (m,32,32), incoming labels 1=anomalous)."""
    digits = load_digits()
    images = np.kron(digits.images, np.ones((4, 4)))  # 8x8 -> 32x32, values 0..16
    images = (images * (255 / 16)).round().astype(np.uint8)
    normal_idx = np.flatnonzero(digits.target == normal_digit)
    normal = images[normal_idx[:n_normal]]
    others = np.flatnonzero(digits.target != normal_digit)[: n_incoming * 2 // 3]
    rest = np.sort(np.concatenate([normal_idx[n_normal:][: n_incoming - len(others)], others]))
    return normal, images[rest], (digits.target[rest] != normal_digit).astype(int)


@pytest.fixture(scope="session")
def digit_store(tmp_path_factory):
    """A local image store: normal/ (digit 0), incoming/ and incoming.csv with labels."""
    root = tmp_path_factory.mktemp("store")
    normal, incoming, labels = digit_images()
    write_png_store(normal, [f"n{i:03d}" for i in range(len(normal))], str(root / "normal"))
    names = [f"i{i:03d}" for i in range(len(incoming))]
    write_png_store(incoming, names, str(root / "incoming"))
    write_manifest([{"uri": f"incoming/{n}.png", "label": int(y)}
                    for n, y in zip(names, labels, strict=True)], str(root / "incoming.csv"))
    return root


# --------------------------------------------------------------------------
# Results directories and the browser, shared by the report tests
# --------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_TIMEOUT_S = 60
# Neighbours per row and distinct image files in make_results_dir.
K = 3
N_IMAGES = 30
ALPHA = 0.01  # make_results_dir's rows are flagged at p <= ALPHA


def make_images(root: Path, n: int = N_IMAGES) -> list[str]:
    """n small, distinct real PNG files; returns their paths."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    uris = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
        pixels[:, : i % 28] //= 4  # make them visibly different, not just noise
        path = root / f"img_{i:02d}.png"
        Image.fromarray(pixels).save(path)
        uris.append(str(path))
    return uris


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1 = highest score; ties share the lower rank."""
    order = np.sort(scores)[::-1]
    return np.searchsorted(-order, -scores, side="left") + 1


def make_results_dir(root: Path, n_rows: int, *, groups: bool = True, label: bool = True,
                     n_shards: int = 2, n_errors: int = 3) -> dict:
    """A synthetic, committed `dn2 score` results dir + index dir with real images.

    Rows reuse the same N_IMAGES image files, so the image set does not grow
    with n_rows. Returns paths and the arrays the tables were built from.
    """
    images = make_images(root / "images")
    rng = np.random.default_rng(7)
    labels = (rng.random(n_rows) < 0.2).astype(np.int64)
    scores = rng.normal(1.0, 0.3, n_rows) + 0.8 * labels
    normal_loo = rng.normal(1.0, 0.3, 500)
    results, index = root / "results", root / "index"
    results.mkdir()
    index.mkdir()
    table = _anomalies(images, scores, labels if label else None, normal_loo, rng)
    bounds = np.linspace(0, n_rows, n_shards + 1).astype(int)
    for s in range(n_shards):
        shard = table.slice(bounds[s], bounds[s + 1] - bounds[s])
        pq.write_table(shard, results / f"anomalies-{s:05d}-of-{n_shards:05d}.parquet")
    pq.write_table(_errors(root, n_errors), results / "errors-00000-of-00001.parquet")
    if groups:
        pq.write_table(_groups(images), results / "groups-00000-of-00001.parquet")
    _write_index(index, normal_loo)
    flagged = scores[table["flagged"].to_numpy(zero_copy_only=False)]
    _commit_results(results, index, n_rows, n_errors, flagged)
    return {"results": str(results), "index": str(index), "images": images, "labels": labels,
            "scores": scores, "p_values": table["p_value"].to_pylist()}


def _anomalies(images: list[str], scores: np.ndarray, labels: np.ndarray | None,
               normal_loo: np.ndarray, rng: np.random.Generator) -> pa.Table:
    n_rows = len(scores)
    columns = {
        "uri": [images[i % N_IMAGES] for i in range(n_rows)],
        "score": scores,
        "rank": _ranks(scores),
        "percentile": 100.0 * np.searchsorted(np.sort(normal_loo), scores, side="left") / 500,
        "p_value": (1 + (normal_loo[None, :] >= scores[:, None]).sum(axis=1)) / 501,
        "flagged": (1 + (normal_loo[None, :] >= scores[:, None]).sum(axis=1)) / 501 <= ALPHA,
        "neighbor_uris": pa.array([[images[(i + j + 1) % N_IMAGES] for j in range(K)]
                                   for i in range(n_rows)], pa.list_(pa.string())),
        "neighbor_distances": pa.array([sorted(rng.random(K).tolist()) for _ in range(n_rows)],
                                       pa.list_(pa.float64())),
        "partition": ["2024-06-01"] * n_rows,
        "backbone": ["efficientnet_lite0"] * n_rows,
        "index_id": ["idx-abc"] * n_rows,
        "sha256": ["0" * 64] * n_rows,
        "class": [f"c{i % 10}" for i in range(n_rows)],
    }
    if labels is not None:
        columns["label"] = labels
    return pa.table(columns)


def _errors(root: Path, n_errors: int) -> pa.Table:
    return pa.table({
        "uri": [f"{root}/bad_{i}.png" for i in range(n_errors - 1)] + ["<script>x</script>"],
        "stage": ["decode"] * (n_errors - 1) + ["read"],
        "error": ["empty file (0 bytes)"] * (n_errors - 1) + ["file not found"],
        "partition": ["2024-06-01"] * n_errors,
    })


def _groups(images: list[str]) -> pa.Table:
    return pa.table({
        "group": [f"g{i}" for i in range(5)],
        "score": [5.0, 4.0, 3.0, 2.0, 1.0],
        "rank": [1, 2, 3, 4, 5],
        "size": [6, 2, 2, 2, 2],
        "member_uris": [images[:6], *[images[i : i + 2] for i in range(4)]],
        "neighbor_groups": [["n1", "n2"]] * 5,
    })


def _write_index(index: Path, normal_loo: np.ndarray) -> None:
    """normal.parquet (the leave-one-out scores) and the index's commit marker."""
    pq.write_table(pa.table({
        "uri": [f"normal_{i}.png" for i in range(501)],
        "sha256": ["1" * 64] * 501,
        "loo_score": np.append(normal_loo, 99.0),
        "kept": [True] * 500 + [False],  # the dropped duplicate must not count
    }), index / "normal.parquet")
    (index / outputs.MARKER).write_text(json.dumps({"kind": "index"}))


def _commit_results(results: Path, index: Path, n_rows: int, n_errors: int,
                    flagged: np.ndarray) -> None:
    """summary.json and the _SUCCESS marker, as dn2 score's last step writes them."""
    summary = {
        "count_in": n_rows + n_errors,
        "scored": n_rows,
        "errored": n_errors,
        "partition": "2024-06-01",
        "backbone": "efficientnet_lite0",
        "index_id": "idx-abc",
        "index_dir": str(index),
        "input": "gs://bucket/manifest.csv",
        "errors_by_stage": {"decode": n_errors - 1, "read": 1},
        "timings": {"total_s": 12.5, "embed_s": 10.0},
        "created_at": "2024-06-01T03:00:00+00:00",
        "flags": {"rule": "alpha", "level": ALPHA, "flagged": len(flagged),
                  "threshold": float(flagged.min()) if len(flagged) else None,
                  "p_value_floor": 1 / 501, "reference_n": 500},
    }
    (results / "summary.json").write_text(json.dumps(summary))
    (results / outputs.MARKER).write_text(json.dumps({"kind": "results", **summary}))


def mark_cleaned(index: str | Path, images: list[str], n_removed: int, seed: int = 3) -> list:
    """Rewrites a make_results_dir index as one whose auto cleaning removed ``n_removed`` of
    its normal images (real image files, so the report shows them); returns their
    (clean_score, uri), most suspicious first."""
    rng = np.random.default_rng(seed)
    n = n_removed + 10
    uris = [images[i % len(images)] for i in range(n)]
    scores = rng.normal(0.0, 1.0, n)
    kept = np.arange(n) >= n_removed
    scores[~kept] += 5.0
    pq.write_table(pa.table({"uri": uris, "sha256": ["1" * 64] * n, "kept": kept,
                             "loo_score": rng.normal(1.0, 0.3, n), "clean_score": scores}),
                   Path(index) / "normal.parquet")
    cleaning = {"rule": "auto", "estimated_rate": n_removed / n, "removed": n_removed, "of": n,
                "threshold": 3.5, "sample": None, "rounds": 2, "k_c": 10, "k_s": 10, "z": 3.0}
    (Path(index) / outputs.MARKER).write_text(json.dumps({"kind": "index", "cleaning": cleaning}))
    return sorted(zip(scores[~kept], np.array(uris)[~kept], strict=True), reverse=True)


@pytest.fixture
def chromium(tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """Runs headless Chromium (Debian's ``chromium``) with ARGS and a fresh profile."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install the Debian package 'chromium'")
    profile = tmp_path / "chromium-profile"

    def run(*args: str) -> subprocess.CompletedProcess:
        profile.mkdir(exist_ok=True)
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S,
                              check=False)

    return run


class ParsedPage(HTMLParser):
    """A page's elements (tag, attributes), <title> and other text, as a browser's parser sees
    them (character references decoded): what a page shows, not how it was spelt."""

    def __init__(self, doc: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.title = ""
        self._in_title = False
        self.feed(doc)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        else:
            self.text.append(data)

    def tags(self, tag: str) -> list[dict[str, str]]:
        """The attributes of every ``tag`` element."""
        return [attrs for t, attrs in self.elements if t == tag]


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs_server(tmp_path_factory):
    server = FakeGcs(tmp_path_factory.mktemp("fake-gcs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def bigquery_emulator(tmp_path_factory):
    """bqemulator on 127.0.0.1 (tests/bigquery_emulator.py), for the ``bigquery`` tests."""
    from tests.bigquery_emulator import BigQueryEmulator

    server = BigQueryEmulator(tmp_path_factory.mktemp("bqemulator")).start(timeout=90)
    yield server
    server.stop()


@contextlib.contextmanager
def new_bucket(request, kind: str):
    """A new bucket on a real S3 (moto, ``kind`` "s3") or GCS (fake-gcs-server, "gs")
    server on 127.0.0.1, with the environment pointing every client at it while the block
    runs: its URL, s3://... or gs://..."""
    server = request.getfixturevalue("moto_server" if kind == "s3" else "fake_gcs_server")
    with pytest.MonkeyPatch.context() as mp, (
            fake_gcs_compatible() if kind == "gs" else contextlib.nullcontext()):
        for k, v in server.env.items():
            mp.setenv(k, v)
        yield server.new_bucket(f"dn2-{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module", params=["s3", "gs"])
def bucket(request):
    """new_bucket for the module, on each server."""
    with new_bucket(request, request.param) as url:
        yield url



# -- references shared by the tests: brute-force numpy, hand-written transforms ----------

def brute_dists(xq, xb) -> np.ndarray:
    """All-pairs Euclidean distances (nq, nb), float64, one query row at a time."""
    xq = np.asarray(xq, dtype=np.float64)
    xb = np.asarray(xb, dtype=np.float64)
    return np.stack([np.linalg.norm(xb - q, axis=1) for q in xq])


def brute_knn(xq, xb, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) of the k nearest rows of xb, ties to the lower id."""
    R = brute_dists(xq, xb)
    I = np.argsort(R, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(R, I, axis=1), I


def brute_scores(xq, xb, k: int) -> np.ndarray:
    """DN2 scores by hand: the mean of the k smallest Euclidean distances to xb, per query."""
    return np.sort(brute_dists(xq, xb), axis=1)[:, :k].mean(axis=1)


def brute_loo_scores(x, k: int) -> np.ndarray:
    """Leave-one-out DN2 scores of the rows of x (each row's own distance left out)."""
    R = brute_dists(x, x)
    np.fill_diagonal(R, np.inf)
    return np.sort(R, axis=1)[:, :k].mean(axis=1)


def sqrt_l2(x: np.ndarray) -> np.ndarray:
    """--feature-transform sqrt-l2, by hand: signed square root, then unit length."""
    x = np.sign(x) * np.sqrt(np.abs(x.astype(np.float64)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def root4_l2(x: np.ndarray) -> np.ndarray:
    """dn2's default feature transform (root4-l2), by hand: signed square root of the
    signed square root, then unit length."""
    x = x.astype(np.float64)
    x = np.sign(x) * np.sqrt(np.sqrt(np.abs(x)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# The backbone metadata of toy feature directories (8-d rows, not from a real backbone).
META = {"backbone": "toy", "dim": 8,
        "preprocessing": {"resize": 8, "crop": 8, "mean": [0, 0, 0], "std": [1, 1, 1]}}


def write_features(directory, X: np.ndarray, rows_per_shard: list[int], start: int = 0,
                   meta: dict | None = None) -> list[str]:
    """A committed features directory holding X (n, d) split into shards; returns the uris.
    Row i is image ``start + i`` (uri and sha256); ``meta`` replaces META in its marker."""
    assert sum(rows_per_shard) == len(X)
    uris = [f"mem://img/{i:05d}.png" for i in range(start, start + len(X))]
    staging = outputs.new_staging(str(directory))
    fs, path = outputs.fs_and_path(staging)
    fs.makedirs(path, exist_ok=True)
    bounds = np.cumsum([0] + rows_per_shard)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(X[a:b].ravel()), X.shape[1])
        table = pa.table({"uri": uris[a:b], "sha256": [f"h{start + i}" for i in range(a, b)],
                          "backbone": ["toy"] * (b - a), "dim": [X.shape[1]] * (b - a),
                          "embedding": emb.cast(pa.list_(pa.float32()))},
                         schema=features.feature_schema())
        pq.write_table(table, f"{path}/features-{s:05d}-of-{len(rows_per_shard):05d}.parquet")
    outputs.commit(staging, str(directory),
                   {"kind": features.KIND, **(meta or META), "dim": X.shape[1]})
    return uris


def clustered(n: int, d: int = 8, centers: int = 6, seed: int = 0, offset: float = 20.0):
    """A Gaussian mixture with a large common offset (CNN features are far from 0)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 4, (centers, d))
    X = c[rng.integers(0, centers, n)] + rng.normal(0, 1, (n, d)) + offset
    return X.astype(np.float32)
