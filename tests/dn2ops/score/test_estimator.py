"""DN2Scorer against a brute-force numpy reference and planted anomalies."""

import pickle

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dn2ops.config import CLEAN_K
from dn2ops.score.estimator import DN2Scorer, NotFittedError
from tests.conftest import brute_dists, brute_loo_scores, brute_scores


def gaussian(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) + shift).astype(np.float32)


def planted(seed=0):
    """500 normal train points in 32-d; test = 200 normal + 20 far outliers."""
    rng = np.random.default_rng(seed)
    train = rng.standard_normal((500, 32)).astype(np.float32)
    normal = rng.standard_normal((200, 32))
    outliers = rng.standard_normal((20, 32)) + 8.0 * rng.choice([-1, 1], (20, 32))
    X = np.vstack([normal, outliers]).astype(np.float32)
    y = np.r_[np.zeros(200), np.ones(20)]
    return train, X, y


# -- construction / fitted attributes -------------------------------------------------


def test_init_only_stores_params():
    s = DN2Scorer(k=3, n_centroids=4, clean_fraction=0.1, kmeans_niter=5, seed=7)
    assert vars(s) == {
        "k": 3,
        "n_centroids": 4,
        "clean_fraction": 0.1,
        "clean_k": None,
        "kmeans_niter": 5,
        "seed": 7,
    }
    with pytest.raises(TypeError):
        DN2Scorer(3)  # keyword-only


def test_fit_sets_attributes_and_returns_self():
    X = gaussian(50, 6, seed=0)
    s = DN2Scorer(k=2)
    assert s.fit(X) is s
    assert s.n_features_in_ == 6 and s.n_train_ == 50
    assert s.kept_mask_.dtype == bool and s.kept_mask_.all()
    assert s.centroids_ is None and s.index_.ntotal == 50
    assert s.train_scores_.dtype == np.float64 and s.train_scores_.shape == (50,)
    np.testing.assert_allclose(s.train_scores_, brute_loo_scores(X, 2), rtol=1e-5)


# -- scores vs brute force ---------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
def test_score_samples_matches_brute_force(k):
    train = gaussian(1500, 40, seed=1, shift=25.0)
    test = gaussian(250, 40, seed=2, shift=25.0)
    scores = DN2Scorer(k=k).fit(train).score_samples(test)
    assert scores.dtype == np.float64 and scores.shape == (250,)
    np.testing.assert_allclose(scores, brute_scores(test, train, k), rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_score_samples_with_duplicates(k):
    rng = np.random.default_rng(k)
    train = rng.integers(0, 3, size=(100, 5)).astype(np.float32)
    train = np.vstack([train, train[:20]])
    test = np.vstack([train[:10], rng.integers(0, 3, size=(20, 5))]).astype(np.float32)
    s = DN2Scorer(k=k).fit(train)
    np.testing.assert_allclose(
        s.score_samples(test), brute_scores(test, train, k), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        s.train_scores_, brute_loo_scores(train, k), rtol=1e-4, atol=1e-6
    )


def test_centroids_c_equals_n_is_exact_1nn():
    train = gaussian(80, 12, seed=3, shift=4.0)
    test = gaussian(30, 12, seed=4, shift=4.0)
    # k is ignored for scoring in centroid mode: nearest centre only.
    s = DN2Scorer(k=3, n_centroids=80).fit(train)
    np.testing.assert_allclose(
        s.score_samples(test), brute_scores(test, train, 1), rtol=1e-5
    )


def test_centroids_c1_is_distance_to_mean():
    train = gaussian(600, 8, seed=5, shift=2.0)
    test = gaussian(20, 8, seed=6)
    s = DN2Scorer(n_centroids=1).fit(train)
    mean = train.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(s.centroids_[0], mean, atol=1e-4)
    np.testing.assert_allclose(
        s.score_samples(test), np.linalg.norm(test - mean, axis=1), rtol=1e-4
    )
    assert s.train_scores_.shape == (600,)


# -- planted anomalies -------------------------------------------------------------------


@pytest.mark.parametrize("params", [{"k": 2}, {"k": 2, "n_centroids": 5}])
def test_planted_outliers_auc_is_one(params):
    train, X, y = planted()
    scores = DN2Scorer(**params).fit(train).score_samples(X)
    assert roc_auc_score(y, scores) == 1.0


def test_cleaning_removes_planted_impurities_and_unmasks_anomalies():
    rng = np.random.default_rng(42)
    d = 16
    normal = rng.standard_normal((456, d))
    # 12 pairs of impurities far from the normal cluster (radius 25, pairs
    # ~35 apart).  Each is 1.0 from its partner, so its leave-one-out k=2
    # score is ~(1 + 20)/2, far above any normal point's (< ~6).
    dirs = rng.standard_normal((12, d))
    centres = 25.0 * dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    u = rng.standard_normal((12, d))
    u = 0.5 * u / np.linalg.norm(u, axis=1, keepdims=True)
    impurities = np.vstack([centres + u, centres - u])
    train = np.vstack([normal, impurities]).astype(np.float32)  # 480 rows, 5% bad
    is_impurity = np.r_[np.zeros(456, bool), np.ones(24, bool)]

    # Test anomalies sit right on the impurity pairs: without cleaning both
    # of their k=2 neighbours are impurities, so they look MORE normal than
    # genuine normal points (masking).
    anomalies = centres + 0.1 * rng.standard_normal((12, d))
    X = np.vstack([rng.standard_normal((200, d)), anomalies]).astype(np.float32)
    y = np.r_[np.zeros(200), np.ones(12)]

    dirty = DN2Scorer(k=2).fit(train)
    clean = DN2Scorer(k=2, clean_fraction=0.05).fit(train)

    np.testing.assert_array_equal(clean.kept_mask_, ~is_impurity)
    assert clean.n_train_ == 456 and clean.index_.ntotal == 456
    np.testing.assert_allclose(
        clean.train_scores_, brute_loo_scores(train[~is_impurity], 2), rtol=1e-5
    )
    auc_dirty = roc_auc_score(y, dirty.score_samples(X))
    auc_clean = roc_auc_score(y, clean.score_samples(X))
    assert auc_dirty < 0.1
    assert auc_clean == 1.0


def test_default_cleaning_finds_impurities_that_sit_together():
    """Impurities of one kind are each other's nearest neighbours (as images of another
    class are): their leave-one-out score over 2 neighbours is LOWER than a normal point's,
    so cleaning with k=2 keeps them; the default cleaning score (CLEAN_K neighbours)
    drops exactly them, as the brute-force leave-one-out score over CLEAN_K says."""
    rng = np.random.default_rng(5)
    d = 16
    normal = rng.standard_normal((380, d))
    centres = 10.0 * np.eye(d)[:2]  # two tight clusters of 10 impurities, far away
    impurities = np.vstack([c + 0.3 * rng.standard_normal((10, d)) for c in centres])
    train = np.vstack([normal, impurities]).astype(np.float32)  # 400 rows, 5% impure
    is_impurity = np.r_[np.zeros(380, bool), np.ones(20, bool)]

    old_rule = DN2Scorer(k=2, clean_fraction=0.05, clean_k=2).fit(train)
    assert old_rule.kept_mask_[is_impurity].all()  # k=2 finds none of them
    default = DN2Scorer(k=2, clean_fraction=0.05).fit(train)
    np.testing.assert_array_equal(default.kept_mask_, ~is_impurity)
    worst = np.argsort(-brute_loo_scores(train, CLEAN_K), kind="stable")[:20]
    np.testing.assert_array_equal(np.sort(worst), np.flatnonzero(is_impurity))
    # The scores of the kept set stay the scoring k's (2), not the cleaning's.
    np.testing.assert_allclose(default.train_scores_, brute_loo_scores(normal, 2), rtol=1e-5)


def test_cleaning_k_is_capped_at_the_other_points():
    X = gaussian(12, 3, seed=2)
    X[0] += 20.0
    s = DN2Scorer(k=2, clean_fraction=0.1).fit(X)  # CLEAN_K > n - 1: every other point
    worst = np.argmax(brute_loo_scores(X, 11))
    assert not s.kept_mask_[worst] and s.kept_mask_.sum() == 11
    with pytest.raises(ValueError, match="clean_k"):
        DN2Scorer(clean_k=0, clean_fraction=0.1).fit(X)


def test_cleaning_keeps_at_least_k_plus_one():
    X = gaussian(10, 3, seed=7)
    s = DN2Scorer(k=2, clean_fraction=0.9).fit(X)
    assert s.n_train_ == 3 and s.kept_mask_.sum() == 3
    s = DN2Scorer(k=1, n_centroids=4, clean_fraction=0.9).fit(X)
    assert s.n_train_ == 4 and s.centroids_.shape == (4, 3)


def test_cleaning_with_centroids():
    train, X, y = planted(seed=3)
    s = DN2Scorer(k=2, n_centroids=5, clean_fraction=0.02).fit(train)
    assert s.n_train_ == 490 and (~s.kept_mask_).sum() == 10
    assert roc_auc_score(y, s.score_samples(X)) == 1.0


# -- kneighbors / percentile ---------------------------------------------------------------


@pytest.mark.parametrize("n_centroids", [None, 3])
def test_kneighbors_index_into_kept_set(n_centroids):
    train = gaussian(100, 5, seed=8)
    train[:5] += 30.0  # isolated points that cleaning removes
    test = gaussian(15, 5, seed=9)
    s = DN2Scorer(k=3, n_centroids=n_centroids, clean_fraction=0.05).fit(train)
    assert not s.kept_mask_[:5].any()
    D, I = s.kneighbors(test)
    assert D.shape == I.shape == (15, 3)
    kept = train[s.kept_mask_]
    np.testing.assert_allclose(
        D, brute_dists(test, kept)[np.arange(15)[:, None], I], rtol=1e-5
    )
    np.testing.assert_allclose(
        D, np.sort(brute_dists(test, kept), axis=1)[:, :3], rtol=1e-5
    )
    D1, _ = s.kneighbors(test, n_neighbors=1)
    assert D1.shape == (15, 1)
    with pytest.raises(ValueError, match="n_neighbors"):
        s.kneighbors(test, n_neighbors=96)


def test_percentile_hand_example():
    # 1-D points 0, 1, 3, 6 with k=1: leave-one-out NN distances 1, 1, 2, 3.
    s = DN2Scorer(k=1).fit(np.array([[0.0], [1.0], [3.0], [6.0]]))
    np.testing.assert_allclose(s.train_scores_, [1, 1, 2, 3])
    # Percentage of training scores STRICTLY below each score.
    got = s.percentile(np.array([0.5, 1.0, 1.5, 2.0, 3.0, 10.0]))
    np.testing.assert_allclose(got, [0, 0, 50, 50, 75, 100])
    assert got.dtype == np.float64


def test_percentile_monotone():
    train, X, _ = planted()
    s = DN2Scorer(k=2).fit(train)
    scores = np.sort(s.score_samples(X))
    p = s.percentile(scores)
    assert (np.diff(p) >= 0).all()
    assert p.min() >= 0 and p.max() == 100.0
    with pytest.raises(ValueError, match="1-D"):
        s.percentile(scores[:, None])
    with pytest.raises(ValueError, match="NaN"):
        s.percentile(np.array([np.nan]))


# -- pickling (Beam ships fitted scorers to workers) ------------------------------------------


@pytest.mark.parametrize("n_centroids", [None, 4])
def test_pickle_round_trip(n_centroids):
    train, X, _ = planted()
    s = DN2Scorer(k=2, n_centroids=n_centroids).fit(train)
    s2 = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(s2.score_samples(X), s.score_samples(X))
    np.testing.assert_array_equal(
        s2.percentile(s2.score_samples(X)), s.percentile(s.score_samples(X))
    )
    # Unfitted scorers pickle too.
    assert vars(pickle.loads(pickle.dumps(DN2Scorer(k=4)))) == vars(DN2Scorer(k=4))


# -- bad input ---------------------------------------------------------------------------------


def test_k_too_large():
    X = gaussian(5, 3, seed=0)
    with pytest.raises(ValueError, match=r"k=5 is too large for n=5"):
        DN2Scorer(k=5).fit(X)
    with pytest.raises(ValueError, match=r"k=6 is too large for n=5"):
        DN2Scorer(k=6).fit(X)
    with pytest.raises(ValueError, match=r"n_centroids=6 is larger .* n=5"):
        DN2Scorer(n_centroids=6).fit(X)
    # Centroid mode without cleaning does not need k <= n - 1.
    DN2Scorer(k=5, n_centroids=5).fit(X)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"k": 0}, "k must be"),
        ({"k": 1.5}, "k must be"),
        ({"n_centroids": 0}, "n_centroids"),
        ({"clean_fraction": 1.0}, "clean_fraction"),
        ({"clean_fraction": -0.1}, "clean_fraction"),
        ({"kmeans_niter": 0}, "kmeans_niter"),
    ],
)
def test_bad_params(params, match):
    with pytest.raises(ValueError, match=match):
        DN2Scorer(**params).fit(gaussian(20, 3, seed=0))


def test_bad_X():
    X = gaussian(20, 4, seed=0)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DN2Scorer().fit(bad)
    with pytest.raises(ValueError, match="2-D"):
        DN2Scorer().fit(X[0])
    with pytest.raises(ValueError, match="at least one training sample"):
        DN2Scorer().fit(X[:0])
    s = DN2Scorer().fit(X)
    with pytest.raises(ValueError, match=r"X has 3 features.*fitted with 4 features"):
        s.score_samples(X[:, :3])
    with pytest.raises(ValueError, match=r"X has 3 features.*fitted with 4 features"):
        s.kneighbors(X[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        s.score_samples(bad)


def test_not_fitted():
    s = DN2Scorer()
    for call in (s.score_samples, s.kneighbors, s.percentile):
        with pytest.raises(NotFittedError, match="not fitted"):
            call(np.zeros((1, 2)))
