"""benchmarks/baselines.py: score direction of every baseline, hand-computed values, files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from sklearn.svm import OneClassSVM

from benchmarks import baselines as bl


def planted(seed: int = 0, d: int = 12, n_train: int = 40, n_test_per_class: int = 30,
            n_classes: int = 3):
    """Each class a compact blob (sd 0.3) around its own centre (spread 3): train, test, y."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3.0, (n_classes, d))
    train = {c: (centres[c] + 0.3 * rng.normal(size=(n_train, d))).astype(np.float32)
             for c in range(n_classes)}
    y = np.repeat(np.arange(n_classes), n_test_per_class)
    X = (centres[y] + 0.3 * rng.normal(size=(len(y), d))).astype(np.float32)
    return train, X, y


ESTIMATORS = {
    "knn": lambda: bl.knn_scorer(2),
    "mean-dist": bl.MeanDistance,
    "mahalanobis": bl.Mahalanobis,
    "ocsvm-raw": lambda: bl.OCSVM(0.1, 1.0, standardize=False),
    "ocsvm-std": lambda: bl.OCSVM(0.1, 1.0, standardize=True),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_higher_score_means_more_anomalous(name):
    train, X, y = planted()
    est = ESTIMATORS[name]().fit(train[0])
    s = np.asarray(est.score_samples(X))
    assert s.shape == (len(X),)
    # The planted normal blob is far from the others: every anomaly must outscore
    # every normal point, which fails if the sign is flipped.
    assert s[y != 0].min() > s[y == 0].max()
    centre = train[0].mean(axis=0, keepdims=True)
    far = centre + 20.0
    assert est.score_samples(far)[0] > est.score_samples(centre)[0]


def test_mean_distance_hand_values():
    X = np.array([[0, 0], [2, 0], [0, 2], [2, 2]], np.float32)  # mean (1, 1)
    Q = np.array([[1, 1], [4, 5], [1, 0]], np.float32)
    np.testing.assert_allclose(bl.MeanDistance().fit(X).score_samples(Q), [0.0, 5.0, 1.0])


def test_mean_distance_matches_numpy():
    train, X, _ = planted(seed=3)
    ref = np.sqrt(((X.astype(np.float64) - train[1].astype(np.float64).mean(0)) ** 2).sum(1))
    np.testing.assert_allclose(bl.MeanDistance().fit(train[1]).score_samples(X), ref,
                               rtol=1e-12)


def test_mahalanobis_matches_sklearn_and_inverse_covariance():
    train, X, _ = planted(seed=4, d=30, n_train=20)  # n < d: shrinkage is what makes it work
    got = bl.Mahalanobis().fit(train[2]).score_samples(X)
    lw = LedoitWolf().fit(train[2].astype(np.float64))
    np.testing.assert_allclose(got, np.sqrt(lw.mahalanobis(X.astype(np.float64))), rtol=1e-9)
    diff = X.astype(np.float64) - lw.location_
    ref = np.sqrt(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(lw.covariance_), diff))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_ocsvm_gamma_mult_one_is_sklearn_scale():
    train, X, _ = planted(seed=5)
    got = bl.OCSVM(0.1, 1.0, standardize=False).fit(train[0]).score_samples(X)
    ref = -OneClassSVM(kernel="rbf", nu=0.1, gamma="scale").fit(
        train[0].astype(np.float64)).decision_function(X.astype(np.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_bootstrap_interval():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    perfect = {0: (y != 0).astype(float) + 0.01 * rng.random(100)}
    noise = {0: rng.random(100)}
    assert bl.bootstrap_mean_auc_diff(perfect, perfect, y, n_boot=50) == (0.0, 0.0)
    lo, hi = bl.bootstrap_mean_auc_diff(perfect, noise, y, n_boot=50)
    assert 0.2 < lo <= hi <= 1.0


def test_run_baselines_writes_report(tmp_path):
    train, X, y = planted(seed=1)
    rng = np.random.default_rng(1)
    # Raw "pixels": a class-dependent bright square plus noise, uint8 (n, 28, 28).
    def pixels(labels):
        img = rng.integers(0, 60, (len(labels), 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            img[i, 8 * c:8 * c + 8, 8 * c:8 * c + 8] = 250
        return img
    raw_train = {c: pixels(np.full(len(train[c]), c)) for c in train}
    raw_test = pixels(y)
    res = bl.run_baselines(train, X, y, raw_train, raw_test, str(tmp_path), tsne_class=1,
                           perplexity=10.0, nus=(0.1, 0.5), gamma_mults=(1.0,), n_boot=20,
                           class_names=("a", "b", "c"))
    rows = res["rows"]
    for m in ("knn", "mean-dist", "mahalanobis", "knn-pixels", "ocsvm-raw grid mean",
              "ocsvm-std best/class*", "ocsvm-raw best config*"):
        assert set(rows[m]["roc_auc"]) == {0, 1, 2}, m
        assert rows[m]["fit_seconds"] >= 0 and rows[m]["score_us_per_query"] > 0
    # The mean-distance row, recomputed independently of the module.
    for c in range(3):
        d = np.linalg.norm(X - train[c].mean(0), axis=1)
        assert rows["mean-dist"]["roc_auc"][c] == pytest.approx(roc_auc_score(y != c, d))
    assert rows["knn"]["mean_roc_auc"] == pytest.approx(1.0)
    assert rows["knn-pixels"]["mean_roc_auc"] == pytest.approx(1.0)
    assert len(res["ocsvm_grid"]["raw"]) == 2 and len(res["ocsvm_grid"]["std"]) == 2
    assert "knn_minus_this_ci95" in rows["mahalanobis"]

    png = tmp_path / "tsne-class1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "tsne-classes.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "baselines.md").read_text()
    assert md == res["markdown"]
    assert "| 1 b |" in md and "tsne-class1.png" in md and "knn-pixels" in md
    # A report one level up links the pictures through the folder name.
    assert "](baselines/tsne-class1.png)" in bl.render_markdown(res, "baselines/")
    json.dumps(res)  # JSON-safe without help: the accuracy benchmark dumps it as is
    saved = json.loads((tmp_path / "baselines.json").read_text())
    assert saved["rows"]["knn"]["mean_roc_auc"] == pytest.approx(rows["knn"]["mean_roc_auc"])
    assert saved["protocol"]["n_test"] == len(y)


def test_run_baselines_without_pixels_or_picture(tmp_path):
    train, X, y = planted(seed=2)
    res = bl.run_baselines(train, X, y, None, None, str(tmp_path), tsne_class=None,
                           nus=(0.1,), gamma_mults=(1.0,), n_boot=10)
    assert "knn-pixels" not in res["rows"]
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(ValueError, match="raw_test"):
        bl.run_baselines(train, X, y, {c: np.zeros((5, 28, 28), np.uint8) for c in train},
                         np.zeros((3, 28, 28), np.uint8), str(tmp_path), tsne_class=None,
                         nus=(0.1,), gamma_mults=(1.0,))
