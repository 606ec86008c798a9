"""benchmarks/fashion_mnist.py end to end on a tiny real image store (3 digit classes).

The benchmark's own code writes the PNG store, embeds through ``dn2 embed``, runs
``dn2 build-index`` + ``dn2 score`` per class and writes the report; the checks
recompute the ROC-AUCs independently: brute-force numpy distances over the written
feature shards, labels from the dataset itself (not from the carried column).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from benchmarks import fashion_mnist as bench
from dn2ops.io.features import embeddings, read_table
from tests.conftest import brute_scores, sqrt_l2

N_TRAIN, N_TEST, FLIP_TRAIN, FLIP_TEST = 5, 15, 3, 9


def _digits() -> bench.Dataset:
    """Digits 0, 1, 2 as 32x32 uint8 images; the first 60% train, the rest test."""
    d = load_digits()
    keep = np.flatnonzero(d.target < 3)
    images = (np.kron(d.images[keep], np.ones((4, 4))) * (255 / 16)).round().astype(np.uint8)
    labels = d.target[keep]
    cut = int(0.6 * len(keep))
    return bench.Dataset(images[:cut], labels[:cut], images[cut:], labels[cut:],
                         ("zero", "one", "two"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench")
    argv = ["--train-per-class", str(N_TRAIN), "--test", str(N_TEST), "--cache",
            str(base / "cache"), "--out", str(base / "out"),
            "--hflip-train-per-class", str(FLIP_TRAIN), "--hflip-test", str(FLIP_TEST)]
    res = bench.main(argv, dataset=_digits)
    return base, argv, res


def _features(cache: pathlib.Path, treatment: str, name: str):
    """(ids, features) of one committed features dir, straight from the Parquet shards."""
    [d] = (cache / "features" / treatment).glob(f"{name}-n*")
    table = read_table(str(d), "features")
    return table.column("id").to_pylist(), embeddings(table)


def _dataset_labels(ids: list[str]) -> np.ndarray:
    ds = _digits()
    return np.array([ds.test_labels[int(i.split("/")[-1])] for i in ids])


def test_outputs_are_written(run):
    base, _, res = run
    out = base / "out"
    assert json.loads((out / "results.json").read_text())["protocol"]["test"] == N_TEST
    report = (out / "report.md").read_text()
    for n in range(1, 8):
        assert f"### {n}." in report
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 7
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_pipeline_aucs_match_brute_force_on_written_tables(run):
    base, _, res = run
    cache = base / "cache"
    test_ids, xq = _features(cache, "efficientnet_lite0", "test")
    labels = _dataset_labels(test_ids)
    t1 = res["table1_pipeline"]
    assert len(t1["per_class"]) == 3
    for c in range(3):
        table = read_table(str(base / "out" / "pipeline" / "efficientnet_lite0" / "none" /
                               f"results-c{c}"), "anomalies")
        assert table.num_rows == N_TEST
        ids = [u.rsplit("/", 1)[-1].removesuffix(".png") for u in table.column("uri").to_pylist()]
        direct = roc_auc_score(_dataset_labels(ids) != c, table.column("score").to_numpy())
        train_ids, xb = _features(cache, "efficientnet_lite0", f"train-c{c}")
        assert len(xb) == N_TRAIN and all(i.startswith(f"train/{c}/") for i in train_ids)
        brute = roc_auc_score(labels != c, brute_scores(xq, xb, 2))
        assert 0.0 <= t1["per_class"][c] <= 1.0
        assert t1["per_class"][c] == pytest.approx(direct, abs=1e-9)
        assert t1["per_class"][c] == pytest.approx(brute, abs=1e-9)
        assert res["table1_scorer_check"]["per_class"][c] == pytest.approx(brute, abs=1e-9)
        # The same through the pipeline with --feature-transform sqrt-l2, by hand.
        brute = roc_auc_score(labels != c, brute_scores(sqrt_l2(xq), sqrt_l2(xb), 2))
        assert res["table1_pipeline_sqrt_l2"]["per_class"][c] == pytest.approx(brute, abs=1e-6)


def test_sweeps_agree_with_references(run):
    base, _, res = run
    cache = base / "cache"
    test_ids, xq = _features(cache, "efficientnet_lite0", "test")
    labels = _dataset_labels(test_ids)
    k1 = np.mean([roc_auc_score(labels != c, brute_scores(
        xq, _features(cache, "efficientnet_lite0", f"train-c{c}")[1], 1)) for c in range(3)])
    assert next(r for r in res["table5_k"] if r["k"] == 1)["mean"] == pytest.approx(k1, abs=1e-6)
    # sizes the tiny store cannot support are reported as such, not faked
    assert next(r for r in res["table5_k"] if r["k"] == 20)["mean"] is None
    assert next(r for r in res["table2_kmeans"] if r["C"] == 10)["mean"] is None
    assert next(r for r in res["table3_few_shot"] if r["n"] == "all")["mean"] == pytest.approx(
        res["table1_scorer_check"]["mean"])
    clean0 = res["table4_impurities"][0]
    assert clean0["without_cleaning"]["mean"] == clean0["with_cleaning"]["mean"] == \
        pytest.approx(res["table1_scorer_check"]["mean"])
    for row in res["table2_kmeans"]:
        if row["mean"] is not None:
            assert 0 <= row["mean"] <= 1 and row["score_us_per_query"] > 0
    tta = [r for r in res["table7_treatments"] if "hflip TTA" in r["treatment"]]
    assert tta and all(r["subset"] == [FLIP_TRAIN, FLIP_TEST] for r in tta)


def test_rerun_reuses_the_embedded_features(run):
    base, argv, _ = run
    markers = sorted((base / "cache" / "features").glob("*/*/_SUCCESS"))
    assert len(markers) == 2 * 4  # (lite0, lite0-hflip) x (3 train classes + test)
    before = {p: p.read_text() for p in markers}
    facts = bench.main([*argv, "--embed-only"], dataset=_digits)["embedding"]
    assert facts["efficientnet_lite0"]["images"] == 3 * N_TRAIN + N_TEST
    assert facts["efficientnet_lite0-hflip"]["images"] == 3 * FLIP_TRAIN + FLIP_TEST
    assert {p: p.read_text() for p in markers} == before
