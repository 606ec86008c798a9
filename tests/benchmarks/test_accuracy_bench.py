"""benchmarks/accuracy.py end to end on a tiny real dataset (3 digit classes), and its
cached features against ``dn2 embed``'s on a PNG store of the same images.

The checks recompute what the benchmark reports independently: brute-force numpy
distances over the cached .npy features, labels from the dataset itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from benchmarks import accuracy as bench
from benchmarks import array_features
from benchmarks.datasets import write_manifest, write_png_store
from dn2ops.config import DEFAULT_BACKBONE
from dn2ops.io.features import embeddings, read_table
from pipelines.cli import main as dn2
from tests.conftest import brute_scores, root4_l2, sqrt_l2


def _tiny() -> bench.Dataset:
    """Digits 0, 1, 2 upsampled to 32x32: 14 training images of each class, 24 test images."""
    d = load_digits()
    images = (np.kron(d.images, np.ones((4, 4))) * (255 / 16)).round().astype(np.uint8)
    keep = [np.flatnonzero(d.target == c) for c in range(3)]
    train = np.concatenate([i[:14] for i in keep])
    test = np.concatenate([i[14:22] for i in keep])
    return bench.Dataset("tiny", images[train], d.target[train], images[test], d.target[test],
                         ("zero", "one", "two"), None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("acc")
    mp = pytest.MonkeyPatch()
    mp.setitem(bench.DATASETS, "tiny", _tiny)
    argv = ["--dataset", "tiny", "--cache", str(base / "cache"), "--out", str(base / "out")]
    bench.main(["embed", *argv, "--hflip"])  # lite0 and dn2's default backbone
    res = bench.main(["tables", *argv])
    mp.undo()
    return base, res


def test_cached_features_equal_dn2_embed_on_png_files(run, tmp_path):
    base, _ = run
    ds = _tiny()
    names = [f"t{i:03d}" for i in range(len(ds.test_images))]
    write_png_store(ds.test_images, names, str(tmp_path / "store"))
    write_manifest([{"uri": f"store/{n}.png", "id": n} for n in names],
                   str(tmp_path / "m.csv"))
    assert dn2(["embed", "--input", str(tmp_path / "m.csv"), "--output",
                str(tmp_path / "f")]) == 0
    table = read_table(str(tmp_path / "f"), "features")
    order = np.argsort(table.column("id").to_pylist())
    # dn2 embed's default backbone, as the benchmark embeds it
    cached = np.load(base / "cache" / "tiny" / DEFAULT_BACKBONE / "test.npy")
    np.testing.assert_allclose(cached, embeddings(table)[order], rtol=1e-4, atol=1e-4)
    facts = json.loads((base / "cache" / "tiny" / DEFAULT_BACKBONE / "test.json")
                       .read_text())
    assert facts["images"] == len(names) and facts["images_per_second"] > 0


def test_treatment_aucs_equal_brute_force(run):
    base, res = run
    ds = _tiny()
    feats = {s: np.load(base / "cache" / "tiny" / "efficientnet_lite0" / f"{s}.npy")
             for s in ("train", "test")}
    flip = {s: np.load(base / "cache" / "tiny" / "efficientnet_lite0-hflip" / f"{s}.npy")
            for s in ("train", "test")}
    rows = {r["treatment"]: r for r in res["treatments"]}
    default = {s: np.load(base / "cache" / "tiny" / DEFAULT_BACKBONE / f"{s}.npy")
               for s in ("train", "test")}
    ways = {"none (the paper; dn2's old default)": (feats, lambda x: x),
            "sqrt-l2": (feats, sqrt_l2), "root4-l2": (feats, root4_l2),
            bench.DEFAULT_TREATMENT: (default, root4_l2)}
    for name, (f, fn) in ways.items():
        for c in range(3):
            xb, xq = fn(f["train"][ds.train_labels == c]), fn(f["test"])
            want = roc_auc_score(ds.test_labels != c, brute_scores(xq, xb, 2))
            assert rows[name]["per_class"][c] == pytest.approx(want, abs=1e-4)
    assert default["test"].shape == (24, 2560)
    np.testing.assert_array_equal(res["kmeans"][0]["per_class"],
                                  rows[bench.DEFAULT_TREATMENT]["per_class"])
    for c in range(3):  # flip TTA: the mean of an image's and its mirror's features
        mean = {s: (feats[s] + flip[s]) / 2 for s in feats}
        xb, xq = sqrt_l2(mean["train"][ds.train_labels == c]), sqrt_l2(mean["test"])
        want = roc_auc_score(ds.test_labels != c, brute_scores(xq, xb, 2))
        assert rows["flip TTA, sqrt-l2"]["per_class"][c] == pytest.approx(want, abs=1e-4)
    assert res["not_measured"] == {"efficientnet_lite1": "not embedded"}
    report = (base / "out" / "tiny-n14-t24" / "report.md").read_text()
    assert "| sqrt-l2 | **" in report and "## Impurities" in report
    assert f"`--backbone {DEFAULT_BACKBONE} --feature-transform root4-l2`" in report


def test_every_table_is_written(run):
    base, res = run
    rows = {r["treatment"]: r["per_class"] for r in res["treatments"]}
    for name, aucs in res["curves"]["auc"].items():  # the plotted curves' areas
        assert aucs == rows[name], name
    assert bench.DEFAULT_TREATMENT in res["curves"]["auc"]
    for f in res["curves"]["files"]:
        assert (base / "out" / "tiny-n14-t24" / f).read_bytes()[:4] == b"\x89PNG"
    assert [r["n"] for r in res["few_shot"]] == [1, 10, 14]
    assert [r["method"] for r in res["kmeans"]][1:] == [f"K-means C={c}" for c in (1, 3, 5, 10)]
    assert [r["impurity"] for r in res["impurities"]] == [0.05, 0.10, 0.15, 0.20]
    for row in res["impurities"]:
        for name, _ in bench.CLEAN_RULES:
            assert 0 <= row[name]["removed"] <= 1


def test_kept_scores_equal_a_search_of_the_kept_rows():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((300, 8)).astype(np.float32)
    test = rng.standard_normal((200, 8)).astype(np.float32)
    kept = rng.random(300) > 0.7  # deep lists run out of kept rows: re-searched
    from dn2ops.index.knn import knn

    D, I = knn(test, train, 4)
    assert (kept[I].sum(axis=1) < 2).any()
    got = bench.kept_scores(D, I, kept, train, test, 2)
    np.testing.assert_allclose(got, brute_scores(test, train[kept], 2), rtol=1e-5)


def test_clean_masks_drop_the_highest_leave_one_out_scores():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((120, 6)).astype(np.float32)
    masks = bench.clean_masks(X, 0.1, [2, 10])
    for k, kept in masks.items():
        d = np.sqrt(((X[:, None].astype(np.float64) - X[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        loo = np.sort(d, axis=1)[:, :k].mean(axis=1)
        assert set(np.flatnonzero(~kept)) == set(np.argsort(-loo)[:12])


def test_crops_are_dn2s_geometry():
    images = _tiny().test_images[:2]
    crops = array_features.crops(images, "efficientnet_lite0")
    assert [c.shape for c in crops] == [(3, 224, 224)] * 2 and crops[0].dtype == np.uint8
    assert (crops[0][0] == crops[0][1]).all()  # grey -> RGB: equal channels
