"""dn2ops.report.overlays: the heatmap drawn over each top image, and the page's toggle."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dn2ops.report import render_report
from dn2ops.report.overlays import BOX_COLOUR, MAX_ALPHA, make_overlays, overlay_png
from tests.conftest import make_results_dir


def _png16(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_overlay_fits_the_thumbnail_alpha_by_heat_and_outlines_the_box():
    heat = np.zeros((60, 120), np.uint16)
    heat[:, 60:] = 65535  # right half hottest
    out = Image.open(io.BytesIO(overlay_png(_png16(heat), [60, 0, 120, 60], 48)))
    assert out.mode == "RGBA" and out.size == (48, 24)  # the image's aspect, as a thumbnail
    rgba = np.asarray(out)
    assert rgba[12, 5, 3] == 0  # cold: transparent
    assert rgba[12, 40, 3] == round(MAX_ALPHA * 255)  # hottest: MAX_ALPHA opaque
    assert tuple(rgba[0, 30]) == BOX_COLOUR and tuple(rgba[23, 47]) == BOX_COLOUR


def test_rows_without_a_readable_heatmap_get_no_overlay(tmp_path):
    (tmp_path / "heatmaps").mkdir()
    (tmp_path / "heatmaps" / "a.png").write_bytes(_png16(np.full((8, 8), 1000)))
    rows = [{"uri": "a", "heatmap_uri": "heatmaps/a.png", "hot_box": [0, 0, 4, 4]},
            {"uri": "b", "heatmap_uri": None}, {"uri": "c", "heatmap_uri": "heatmaps/gone.png"}]
    found = make_overlays(str(tmp_path), rows, 32)
    assert list(found) == ["a"] and found["a"].startswith("data:image/png;base64,")
    Image.open(io.BytesIO(base64.b64decode(found["a"].split(",", 1)[1]))).verify()


def _add_heatmaps(results: Path, top: int) -> None:
    """Heatmap columns (and PNGs at each image's size) for the ``top`` ranks."""
    (results / "heatmaps").mkdir()
    for shard in sorted(results.glob("anomalies-*.parquet")):
        t = pq.read_table(shard)
        names, boxes = [], []
        for uri, rank in zip(t["uri"].to_pylist(), t["rank"].to_pylist(), strict=True):
            if rank > top:
                names.append(None)
                boxes.append(None)
                continue
            w, h = Image.open(uri).size
            names.append(f"heatmaps/{rank:03d}.png")
            boxes.append([0, 0, w // 2, h // 2])
            (results / names[-1]).write_bytes(_png16(np.full((h, w), 40000)))
        t = t.append_column("heatmap_uri", pa.array(names, pa.string()))
        pq.write_table(t.append_column("hot_box", pa.array(boxes, pa.list_(pa.int32()))), shard)


def test_report_overlays_the_top_images_with_a_toggle(tmp_path):
    paths = make_results_dir(tmp_path, 40, groups=False)
    plain = render_report(paths["results"], top=6, sample=0)
    assert 'id="heat-toggle"' not in plain and "thumb heat" not in plain
    _add_heatmaps(Path(paths["results"]), top=3)
    html = render_report(paths["results"], top=6, sample=0)
    assert html.count('<input type="checkbox" id="heat-toggle" checked>') == 1
    assert html.count('class="thumb heat"') == 3
    assert "#heat-toggle:not(:checked) ~ table .heat { display: none; }" in html
