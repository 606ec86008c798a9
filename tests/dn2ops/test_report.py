import base64
import io
import json
import re
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from dn2ops.report import label_is_anomalous, render_report, write_report
from pipelines.report import run

K = 3
N_IMAGES = 30

_THUMB_RE = re.compile(r'<img class="thumb" src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')
_ANY_DATA_RE = re.compile(r'src="data:image/(jpeg|png);base64,([A-Za-z0-9+/=]+)"')
_PLACEHOLDER = 'class="thumb missing"'


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


def make_results_dir(
    root: Path,
    n_rows: int,
    *,
    groups: bool = True,
    label: bool = True,
    n_shards: int = 2,
    n_errors: int = 3,
) -> dict:
    """A synthetic `dn2 score` results dir + index dir with real images.

    Rows reuse the same N_IMAGES image files, so the image set does not grow
    with n_rows. Returns paths and the arrays the tables were built from.
    """
    images = make_images(root / "images")
    rng = np.random.default_rng(7)
    labels = (rng.random(n_rows) < 0.2).astype(np.int64)
    scores = rng.normal(1.0, 0.3, n_rows) + 0.8 * labels
    normal_loo = rng.normal(1.0, 0.3, 500)
    percentiles = 100.0 * np.searchsorted(np.sort(normal_loo), scores, side="left") / 500
    uris = [images[i % N_IMAGES] for i in range(n_rows)]
    neighbours = [[images[(i + j + 1) % N_IMAGES] for j in range(K)] for i in range(n_rows)]
    columns = {
        "uri": uris,
        "score": scores,
        "rank": _ranks(scores),
        "percentile": percentiles,
        "neighbor_uris": pa.array(neighbours, pa.list_(pa.string())),
        "neighbor_distances": pa.array(
            [sorted(rng.random(K).tolist()) for _ in range(n_rows)], pa.list_(pa.float64())
        ),
        "partition": ["2024-06-01"] * n_rows,
        "backbone": ["efficientnet_lite0"] * n_rows,
        "index_id": ["idx-abc"] * n_rows,
        "sha256": ["0" * 64] * n_rows,
        "class": [f"c{i % 10}" for i in range(n_rows)],
    }
    if label:
        columns["label"] = labels
    table = pa.table(columns)

    results, index = root / "results", root / "index"
    results.mkdir()
    index.mkdir()
    bounds = np.linspace(0, n_rows, n_shards + 1).astype(int)
    for s in range(n_shards):
        shard = table.slice(bounds[s], bounds[s + 1] - bounds[s])
        pq.write_table(shard, results / f"anomalies-{s:05d}-of-{n_shards:05d}.parquet")
    errors = pa.table(
        {
            "uri": [f"{root}/bad_{i}.png" for i in range(n_errors - 1)] + ["<script>x</script>"],
            "stage": ["decode"] * (n_errors - 1) + ["read"],
            "error": ["empty file (0 bytes)"] * (n_errors - 1) + ["file not found"],
            "partition": ["2024-06-01"] * n_errors,
        }
    )
    pq.write_table(errors, results / "errors-00000-of-00001.parquet")
    if groups:
        pq.write_table(
            pa.table(
                {
                    "group": [f"g{i}" for i in range(5)],
                    "score": [5.0, 4.0, 3.0, 2.0, 1.0],
                    "rank": [1, 2, 3, 4, 5],
                    "size": [6, 2, 2, 2, 2],
                    "member_uris": [images[:6], *[images[i : i + 2] for i in range(4)]],
                    "neighbor_groups": [["n1", "n2"]] * 5,
                }
            ),
            results / "groups-00000-of-00001.parquet",
        )
    pq.write_table(
        pa.table(
            {
                "uri": [f"normal_{i}.png" for i in range(501)],
                "sha256": ["1" * 64] * 501,
                "loo_score": np.append(normal_loo, 99.0),
                "kept": [True] * 500 + [False],  # the dropped duplicate must not count
            }
        ),
        index / "normal.parquet",
    )
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
    }
    (results / "summary.json").write_text(json.dumps(summary))
    return {
        "results": str(results),
        "index": str(index),
        "images": images,
        "labels": labels,
        "scores": scores,
    }


def section_ids(doc: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', doc)


@pytest.fixture
def small(tmp_path):
    return make_results_dir(tmp_path, 100)


def test_sections_and_thumbnail_count(small):
    doc = render_report(small["results"], index_dir=small["index"], top=5, sample=10)
    assert section_ids(doc) == ["summary", "histogram", "top", "sample", "groups", "roc", "errors"]
    group_thumbs = 4 + 4 * 2  # first group capped at 4 members, four groups of 2
    assert len(_THUMB_RE.findall(doc)) == 5 * (1 + K) + 10 + group_thumbs
    assert _PLACEHOLDER not in doc
    # histogram + ROC curve
    assert doc.count('<img class="plot" src="data:image/png;base64,') == 2
    assert "http://" not in doc and "https://" not in doc  # nothing external
    assert "<script" not in doc and "&lt;script&gt;x&lt;/script&gt;" in doc


def test_every_embedded_image_decodes(small):
    doc = render_report(small["results"], index_dir=small["index"], top=3, sample=5)
    payloads = _ANY_DATA_RE.findall(doc)
    assert len(payloads) == 3 * (1 + K) + 5 + (4 + 2 + 2) + 2  # 3 groups shown
    for fmt, data in payloads:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.format == fmt.upper()
        assert image.width > 0 and image.height > 0


def test_thumbnails_fit_thumb_px(tmp_path):
    images = make_images(tmp_path / "big", 1)
    Image.new("RGB", (400, 200), "red").save(images[0])
    paths = make_results_dir(tmp_path / "r", 10, groups=False)
    table = pq.read_table(Path(paths["results"]) / "anomalies-00000-of-00002.parquet")
    table = table.set_column(0, "uri", pa.array(images * len(table)))
    pq.write_table(table, Path(paths["results"]) / "anomalies-00000-of-00002.parquet")
    doc = render_report(paths["results"], top=10, sample=0, thumb_px=50)
    sizes = {
        Image.open(io.BytesIO(base64.b64decode(d))).size for d in _THUMB_RE.findall(doc)
    }
    assert (50, 25) in sizes
    assert all(max(s) <= 50 for s in sizes)


def test_top_rows_are_the_highest_ranked_with_neighbours(small):
    doc = render_report(small["results"], top=4, sample=0)
    top = doc.split('<section id="top">')[1].split("</section>")[0]
    shown = re.findall(r"<tr><td class='num'>(\d+)</td>", top)
    assert [int(r) for r in shown] == [1, 2, 3, 4]
    assert top.count('<figure class="anomaly">') == 4
    assert top.count('<figure class="neighbor">') == 4 * K


def test_missing_and_corrupt_images_give_placeholders(small, tmp_path):
    path = Path(small["results"]) / "anomalies-00000-of-00002.parquet"
    table = pq.read_table(path)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    uris = table["uri"].to_pylist()
    uris[:] = [str(tmp_path / "gone.png")] * len(uris)
    uris[0] = str(corrupt)
    table = table.set_column(0, "uri", pa.array(uris))
    pq.write_table(table, path)
    doc = render_report(small["results"], top=100, sample=0)  # every row is in the top
    n_missing = len(uris)
    assert doc.count(_PLACEHOLDER) == n_missing
    assert "file not found" in doc
    assert "corrupt" in doc.lower()
    assert len(_THUMB_RE.findall(doc)) == 100 * K + 100 - n_missing + 12


def test_roc_auc_matches_sklearn(small):
    doc = render_report(small["results"], top=1, sample=0)
    expected = roc_auc_score(small["labels"], small["scores"])
    match = re.search(r"id='roc-auc'>([0-9.]+)<", doc)
    assert match and match.group(1) == f"{expected:.4f}"


def test_roc_with_string_labels_and_unknowns(tmp_path):
    paths = make_results_dir(tmp_path, 40, groups=False)
    for shard in sorted(Path(paths["results"]).glob("anomalies-*.parquet")):
        table = pq.read_table(shard)
        words = ["anomalous" if v else "normal" for v in table["label"].to_pylist()]
        words[0] = "unsure"
        table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(words))
        pq.write_table(table, shard)
    doc = render_report(paths["results"], top=1, sample=0)
    keep = np.ones(40, dtype=bool)
    keep[[0, 20]] = False  # first row of each shard is "unsure"
    expected = roc_auc_score(paths["labels"][keep], paths["scores"][keep])
    assert re.search(r"id='roc-auc'>([0-9.]+)<", doc).group(1) == f"{expected:.4f}"
    assert "2 without a usable label" in doc


def test_optional_sections_absent(tmp_path):
    paths = make_results_dir(tmp_path, 20, groups=False, label=False)
    doc = render_report(paths["results"], top=2, sample=2)
    assert section_ids(doc) == ["summary", "histogram", "top", "sample", "errors"]


def test_single_class_labels_do_not_crash(tmp_path):
    paths = make_results_dir(tmp_path, 20, groups=False)
    for shard in Path(paths["results"]).glob("anomalies-*.parquet"):
        table = pq.read_table(shard)
        idx = table.schema.get_field_index("label")
        pq.write_table(table.set_column(idx, "label", pa.array([0] * len(table))), shard)
    doc = render_report(paths["results"], top=1, sample=0)
    assert "roc" in section_ids(doc)
    assert "roc-auc" not in doc and "needs both" in doc


def test_summary_contents(small):
    doc = render_report(small["results"], index_dir=small["index"], top=1, sample=0)
    summary = doc.split('<section id="summary">')[1].split("</section>")[0]
    for text in ("count_in", "103", "scored", "100", "errored", "efficientnet_lite0",
                 "idx-abc", "2024-06-01", "total_s", "12.5 s", "decode", "empty file (0 bytes)"):
        assert text in summary, text


def test_histogram_uses_index_from_summary_or_argument(small, tmp_path):
    with_index = render_report(small["results"], index_dir=small["index"], top=0, sample=0)
    assert "normal set: " in with_index
    # summary.json names the index dir, and it exists here
    assert "normal set: " in render_report(small["results"], top=0, sample=0)
    summary_path = Path(small["results"]) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["index_dir"] = str(tmp_path / "nowhere")
    summary_path.write_text(json.dumps(summary))
    doc = render_report(small["results"], top=0, sample=0)
    assert "not found here" in doc and "histogram" in section_ids(doc)
    with pytest.raises(FileNotFoundError, match="normal.parquet"):
        render_report(small["results"], index_dir=str(tmp_path / "nowhere"))


def test_sample_is_deterministic(small):
    a = render_report(small["results"], top=2, sample=7)
    b = render_report(small["results"], top=2, sample=7)
    assert a == b


def test_errors_table_capped(tmp_path):
    paths = make_results_dir(tmp_path, 10, groups=False, n_errors=620)
    doc = render_report(paths["results"], top=0, sample=0)
    errors = doc.split('<section id="errors">')[1].split("</section>")[0]
    assert errors.count("<tr><td class='uri'>") == 500
    assert "120 more errors not shown" in errors


def test_missing_results_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="results dir not found"):
        render_report(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a dn2 results dir"):
        render_report(str(tmp_path / "empty"))


def test_write_report_local_default_path(small):
    path = write_report(small["results"], top=2, sample=2)
    assert path == small["results"] + "/report.html"
    assert Path(path).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # written under a temp name and moved: nothing else left behind
    assert sorted(p.name for p in Path(small["results"]).glob("*report*")) == ["report.html"]


def test_write_report_memory_filesystem(small):
    fs = fsspec.filesystem("memory")
    fs.put(small["results"], "/dn2-report-test/results", recursive=True)
    try:
        path = write_report("memory://dn2-report-test/results", top=2, sample=2)
        assert path == "memory://dn2-report-test/results/report.html"
        assert fs.cat_file("/dn2-report-test/results/report.html").startswith(b"<!DOCTYPE")
        out = write_report(
            "memory://dn2-report-test/results",
            "memory://dn2-report-test/out/r.html",
            top=1,
            sample=0,
        )
        assert fs.exists(out) and fs.ls("/dn2-report-test/out", detail=False) == [
            "/dn2-report-test/out/r.html"
        ]
    finally:
        fs.rm("/dn2-report-test", recursive=True)


def test_report_size_is_bounded(tmp_path):
    sizes = {}
    for n in (2000, 50000):
        paths = make_results_dir(tmp_path / str(n), n)
        sizes[n] = len(render_report(paths["results"], index_dir=paths["index"]).encode())
    print(f"\nreport size: 2000 rows -> {sizes[2000]:,} B, 50000 rows -> {sizes[50000]:,} B")
    assert abs(sizes[50000] - sizes[2000]) / sizes[2000] < 0.03


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, True), (0, False), (True, True), (False, False), (np.int64(1), True),
        (1.0, True), ("anomaly", True), ("Anomalous", True), ("normal", False),
        ("1", True), ("0", False), (None, None), (2, None), (float("nan"), None),
        ("unsure", None),
    ],
)
def test_label_is_anomalous(value, expected):
    assert label_is_anomalous(value) is expected


def test_cli_writes_and_prints(small, capsys, tmp_path):
    out = tmp_path / "r" / "report.html"
    argv = [small["results"], "--output", str(out), "--index", small["index"], "--top", "2"]
    assert run([*argv, "--sample", "3", "--label-column", "label"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and f"{out.stat().st_size:,} bytes" in printed


def test_cli_missing_dir(tmp_path, capsys):
    assert run([str(tmp_path / "nope")]) == 1
    assert "results dir not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["x", "--top", "many"], ["x", "--sample", "-1"]])
def test_cli_bad_args(argv):
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 2
