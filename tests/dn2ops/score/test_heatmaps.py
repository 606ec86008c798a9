"""dn2ops.score.heatmaps on real images (crops of scikit-learn's sample photos) with a
patch of the other photo pasted at a known place: the heatmap is hottest there, the PNG
is 16-bit at the EXIF-oriented size, a missing neighbour is skipped and recorded, and
the scoring stage fills heatmap_uri / hot_box for exactly its top rows."""

from __future__ import annotations

import io
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from PIL import Image
from sklearn.datasets import load_sample_images

from dn2ops import transforms
from dn2ops.config import IndexConfig, SearchConfig
from dn2ops.embed.backbones import get_spec, load_backbone
from dn2ops.index.build import build_index_from_arrays
from dn2ops.index.knn import knn
from dn2ops.io import features, outputs
from dn2ops.score import heatmaps
from dn2ops.score.images import ScoreFeatures

BACKBONE = "efficientnet_lite0"
SIDE = 128  # small: a few tenths of a second an image
# The pasted patch in every "pasted" image: x0, y0, x1, y1 in its 160 x 120 pixels.
PATCH = (96, 20, 144, 68)


def _crop(photo: np.ndarray, x: int, y: int) -> Image.Image:
    return Image.fromarray(photo[y:y + 240, x:x + 320]).resize((160, 120), Image.BILINEAR)


def _pasted(base: Image.Image, flower: np.ndarray) -> Image.Image:
    x0, y0, x1, y1 = PATCH
    out = base.copy()
    out.paste(Image.fromarray(flower[150:150 + 2 * (y1 - y0), 250:250 + 2 * (x1 - x0)])
              .resize((x1 - x0, y1 - y0)), (x0, y0))
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """normal/: 8 crops of china.jpg at shifted places; query/: 3 more crops, 2 of them
    with a patch of flower.jpg pasted at PATCH."""
    china, flower = load_sample_images().images
    root = tmp_path_factory.mktemp("photos")
    (root / "normal").mkdir()
    (root / "query").mkdir()
    normal = []
    for i, (x, y) in enumerate([(100, 60), (110, 70), (120, 80), (130, 90), (140, 60),
                                (150, 70), (160, 80), (170, 90)]):
        normal.append(str(root / "normal" / f"n{i}.png"))
        _crop(china, x, y).save(normal[-1])
    query = []
    for i, (x, y) in enumerate([(115, 65), (135, 75), (155, 85)]):
        image = _crop(china, x, y)
        query.append(str(root / "query" / f"q{i}.png"))
        (image if i == 0 else _pasted(image, flower)).save(query[-1])
    return root, normal, query


@pytest.fixture(scope="module")
def features_of():
    """uri -> the pooled efficientnet_lite0 feature (the image-level kNN's)."""
    import torch

    spec = get_spec(BACKBONE)
    model = load_backbone(BACKBONE)

    def embed(uris: list[str]) -> np.ndarray:
        crops = np.stack([spec.preprocessing.crop_image(Image.open(u).convert("RGB"))
                          for u in uris])
        with torch.inference_mode():
            return model(spec.preprocessing.normalization()(torch.from_numpy(crops))).numpy()

    return embed


@pytest.fixture(scope="module")
def patch_features():
    return heatmaps.PatchFeatures(BACKBONE, side=SIDE)  # loaded once, on first use


@pytest.mark.parametrize("explain, top, flagged, want", [
    (None, None, 0, 20), (None, 5, 0, 5), (None, 50, 0, 20), (None, 5, 60, 60),
    (None, None, 500, 100), (3, 50, 500, 3), (0, 5, 10, 0)])
def test_explain_count_follows_the_issue_rule(explain, top, flagged, want):
    assert heatmaps.explain_count(explain, top, flagged) == want


def test_hottest_inside_the_pasted_patch(store, patch_features):
    _, normal, query = store
    found = heatmaps.explain(query[1], normal[:2], patch_features)
    assert found.size == (160, 120) and not found.missing and found.error is None
    h, w = found.scores.shape
    assert (w, h) == (SIDE, 96)  # the whole image at SIDE on its long side: no crop
    y, x = np.unravel_index(np.argmax(found.scores), found.scores.shape)
    x0, y0, x1, y1 = PATCH
    assert x0 <= x * 160 / w < x1 and y0 <= y * 120 / h < y1
    bx0, by0, bx1, by1 = heatmaps.hot_box(found.scores, found.size)
    # the hot box overlaps the patch by more than half of the smaller of the two
    inter = max(0, min(bx1, x1) - max(bx0, x0)) * max(0, min(by1, y1) - max(by0, y0))
    assert inter > 0.5 * min((bx1 - bx0) * (by1 - by0), (x1 - x0) * (y1 - y0))


def test_png_is_16_bit_at_the_exif_oriented_size(store, patch_features, tmp_path):
    _, normal, query = store
    # A JPEG stored 160 x 120 landscape, tagged EXIF orientation 6: shown 120 x 160.
    rotated = tmp_path / "portrait.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(query[1]).save(rotated, "JPEG", quality=95, exif=exif.tobytes())
    found = heatmaps.explain(str(rotated), normal[:2], patch_features)
    assert found.size == (120, 160)
    scale = float(found.scores.max()) * 2  # another image of the run was twice as hot
    entry = heatmaps.write_heatmap((7, found), str(tmp_path / "staging"), scale)
    assert entry["heatmap_uri"] == "heatmaps/007-portrait-" + entry["heatmap_uri"][-12:]
    png = Image.open(tmp_path / "staging" / entry["heatmap_uri"])
    assert (png.format, png.mode, png.size) == ("PNG", "I;16", (120, 160))
    values = np.asarray(png)
    assert values.dtype == np.uint16 and 32000 <= values.max() <= 32768  # max / scale = 1/2
    x0, y0, x1, y1 = entry["hot_box"]
    assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 160


def test_a_missing_neighbour_is_skipped_and_recorded(store, patch_features, tmp_path,
                                                     caplog):
    _, normal, query = store
    gone = str(tmp_path / "deleted.png")
    feats = patch_features
    found = heatmaps.explain(query[1], [gone, normal[0]], feats)
    alone = heatmaps.explain(query[1], [normal[0]], feats)
    assert found.missing == (gone,) and found.error is None
    np.testing.assert_array_equal(found.scores, alone.scores)  # the others only
    assert any(gone in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    nothing = heatmaps.explain(query[1], [gone], feats)
    assert nothing.scores is None and nothing.error == "no neighbour could be read"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(Image.open(query[1]).tobytes()[:100])
    broken = heatmaps.explain(str(corrupt), normal[:2], feats)
    assert broken.scores is None and broken.error.startswith("ImageDecodeError")
    entries = [heatmaps.write_heatmap((i, e), str(tmp_path / "s"), 1.0)
               for i, e in enumerate([found, nothing], start=1)]
    result = heatmaps.explained_result(entries, 1.0, {"k": 2})
    assert result["summary"]["missing_neighbors"] == {query[1]: [gone], }
    assert result["summary"]["failed"] == {query[1]: "no neighbour could be read"}
    assert list(result["rows"]) == [query[1]] and result["summary"]["explained"] == 1


def _index(store, features_of, tmp_path, config: IndexConfig) -> str:
    _, normal, _ = store
    X = features_of(normal)
    meta = {**get_spec(BACKBONE).metadata(), "weights_sha256": "x"}
    build_index_from_arrays(normal, [f"h{i}" for i in range(len(normal))], X, meta,
                            str(tmp_path / "index"), config)
    return str(tmp_path / "index")


def _batch(uris: list[str], X: np.ndarray) -> pa.RecordBatch:
    schema = features.feature_schema()
    emb = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), X.shape[1])
    return pa.RecordBatch.from_arrays(
        [pa.array(uris), pa.array([f"s{i}" for i in range(len(uris))]),
         pa.array([BACKBONE] * len(uris)), pa.array([X.shape[1]] * len(uris), pa.int32()),
         emb.cast(pa.list_(pa.float32()))], schema=schema)


def test_scoring_fills_heatmap_columns_for_exactly_the_top_rows(store, features_of, tmp_path):
    _, normal, query = store
    index_dir = _index(store, features_of, tmp_path, IndexConfig(k=2))
    uris = query + normal[:3]  # 6 rows; the top 2 get heatmaps
    staging = Path(outputs.new_staging(str(tmp_path / "results")))
    with BeamTestPipeline() as p:
        _, _, result = (p | beam.Create([_batch(uris, features_of(uris))])
                        | ScoreFeatures(index_dir, str(staging), search=SearchConfig(
                            device="cpu"), explain={"backbone": BACKBONE, "explain": 2,
                                                    "side": SIDE}))
    table = features.read_table(str(staging), "anomalies").to_pylist()
    top = sorted(table, key=lambda r: (-r["score"], r["uri"]))
    assert [r["rank"] for r in top[:2]] == [1, 2]
    for position, r in enumerate(top, start=1):
        if position <= 2:
            assert r["heatmap_uri"].startswith(f"heatmaps/{position:03d}-")
            png = Image.open(staging / r["heatmap_uri"])
            assert png.mode == "I;16" and png.size == (160, 120)
            assert len(r["hot_box"]) == 4
        else:
            assert r["heatmap_uri"] is None and r["hot_box"] is None
    # the scale is the run's maximum: the hotter of the two PNGs reaches 65535
    peaks = [np.asarray(Image.open(staging / r["heatmap_uri"])).max() for r in top[:2]]
    assert 0.98 * 65535 <= max(peaks) <= 65535  # bilinear upsampling rounds the peak off


def test_kmeans_neighbours_by_exact_search_over_the_normal_features(store, features_of,
                                                                    tmp_path):
    _, normal, query = store
    config = IndexConfig(k=2, n_centroids=2, feature_transform=transforms.DEFAULT)
    index_dir = _index(store, features_of, tmp_path, config)
    chosen = [(1, (9.0, query[1], ())), (2, (8.0, query[2], tuple(normal[:3])))]
    got = heatmaps.ExactNeighbours(index_dir, None, 3)(chosen)
    assert got[1] == chosen[1]  # already has k: untouched
    xb = transforms.apply(features_of(normal), config.feature_transform)
    xq = transforms.apply(features_of([query[1]]), config.feature_transform)
    want = knn(xq, xb, 3)[1][0]
    assert got[0] == (1, (9.0, query[1], tuple(normal[j] for j in want)))


def test_png16_scales_by_the_run_maximum():
    scores = np.array([[0.0, 1.0], [2.0, 4.0]], np.float32)
    png = Image.open(io.BytesIO(heatmaps.png16(scores, (2, 2), 4.0)))
    assert np.asarray(png).tolist() == [[0, 16384], [32768, 65535]]
