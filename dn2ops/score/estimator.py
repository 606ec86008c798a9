"""The DN2 estimator (DN2Scorer, scikit-learn style, in memory): mean Euclidean
distance to the k nearest normal neighbours.

Bergman, Cohen & Hoshen, "Deep Nearest Neighbor Anomaly Detection" (2020).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dn2ops.config import check_fit_size, check_params, cleaning_k, is_int
from dn2ops.index.knn import (
    FlatShard,
    as_float32,
    kmeans_centroids,
    knn,
    knn_leave_one_out,
)

__all__ = ["DN2Scorer", "NotFittedError"]

class NotFittedError(ValueError, AttributeError):
    """Raised when a DN2Scorer is used before `fit` (mirrors scikit-learn's)."""


class DN2Scorer:
    """kNN anomaly scorer on pre-extracted features (scikit-learn style).

    Parameters (keyword-only)
    -------------------------
    k : int, default 2
        Number of nearest normal neighbours averaged (kNN mode).
    n_centroids : int or None, default None
        If set, the (kept) training set is summarised by this many faiss
        K-means centroids and the score is the Euclidean distance to the
        NEAREST centroid, as in the paper's K-means speed-up; ``k`` is then
        ignored for scoring (it is still used by cleaning and `kneighbors`).
    clean_fraction : float in [0, 1), default 0.0
        Fraction of training points to discard as presumed impurities before
        fitting: the ``round(clean_fraction * n)`` points with the highest
        leave-one-out kNN score over ``clean_k`` neighbours (ties broken by
        lower index first), capped so
        that at least ``k + 1`` points (kNN mode) or ``n_centroids`` points
        (centroid mode) are kept.  Rounding rather than ceil so that e.g.
        0.05 * 500 drops exactly 25 despite float error.
    clean_k : int or None, default None
        Neighbours of the cleaning score; None: max(k, CLEAN_K) (200), at most
        n - 1. Impurities of one other class are each other's neighbours, so
        the scoring k (2) leaves many of them in place.
    kmeans_niter : int, default 20
    seed : int, default 1234
        K-means iterations and seed.

    Attributes
    ----------
    n_features_in_ : int
    n_train_ : int
        Number of training points kept after cleaning.
    kept_mask_ : bool ndarray (n,)
        True for training rows kept (all True without cleaning).
    train_scores_ : float64 ndarray (n_train_,)
        Scores of the kept training points, used by `percentile`.  kNN mode:
        leave-one-out scores (the point itself excluded).  Centroid mode:
        in-sample distance to the nearest centroid; centroids are fitted on
        these points, so this is biased low and percentiles of new points
        are biased high (conservative).
    centroids_ : float32 ndarray (n_centroids, d) or None
    index_ : faiss.IndexFlatL2
        Over the kept training set (kNN mode) or the centroids, stored shifted
        by their mean (see `dn2ops.index.knn`).  Not pickled; rebuilt on unpickling.
    """

    def __init__(
        self,
        *,
        k: int = 2,
        n_centroids: int | None = None,
        clean_fraction: float = 0.0,
        clean_k: int | None = None,
        kmeans_niter: int = 20,
        seed: int = 1234,
    ) -> None:
        self.k = k
        self.n_centroids = n_centroids
        self.clean_fraction = clean_fraction
        self.clean_k = clean_k
        self.kmeans_niter = kmeans_niter
        self.seed = seed

    def __repr__(self) -> str:
        return (
            f"DN2Scorer(k={self.k!r}, n_centroids={self.n_centroids!r}, "
            f"clean_fraction={self.clean_fraction!r}, clean_k={self.clean_k!r}, "
            f"kmeans_niter={self.kmeans_niter!r}, seed={self.seed!r})"
        )

    # -- validation ---------------------------------------------------------

    def _validate_params(self, n: int) -> None:
        check_params(k=self.k, n_centroids=self.n_centroids,
                     clean_fraction=self.clean_fraction, clean_k=self.clean_k)
        if not is_int(self.kmeans_niter) or self.kmeans_niter < 1:
            raise ValueError(
                f"kmeans_niter must be a positive integer, got {self.kmeans_niter!r}"
            )
        check_fit_size(k=self.k, n_centroids=self.n_centroids,
                       clean_fraction=self.clean_fraction, n=n)

    def _check_fitted(self) -> None:
        if not hasattr(self, "kept_mask_"):
            raise NotFittedError(
                "This DN2Scorer instance is not fitted yet; call fit(X) first."
            )

    def _check_X(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        X = as_float32(X, name="X")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but DN2Scorer was fitted with "
                f"{self.n_features_in_} features"
            )
        return X

    # -- fitting ------------------------------------------------------------

    def fit(self, X: np.ndarray, y: None = None) -> DN2Scorer:
        """Fit on normal (possibly slightly contaminated) features X (n, d).

        ``y`` is ignored (present for scikit-learn API compatibility).
        Returns self.
        """
        X = as_float32(X, name="X")
        n, d = X.shape
        self._validate_params(n)
        k = int(self.k)

        kept = np.ones(n, dtype=bool)
        if self.clean_fraction > 0:
            min_keep = k + 1 if self.n_centroids is None else int(self.n_centroids)
            n_drop = min(round(float(self.clean_fraction) * n), n - min_keep)
            if n_drop > 0:
                D, _ = knn_leave_one_out(X, cleaning_k(k, self.clean_k, n))
                loo = D.mean(axis=1, dtype=np.float64)
                # Stable sort on the negated score: among equal scores the
                # lower index is dropped first, so cleaning is deterministic.
                worst = np.argsort(-loo, kind="stable")[:n_drop]
                kept[worst] = False
        Xk = np.ascontiguousarray(X[kept]) if not kept.all() else X

        self.n_features_in_ = d
        self.n_train_ = int(Xk.shape[0])
        self.kept_mask_ = kept
        # The kept training set is kept (float32) for `kneighbors` and to
        # rebuild the faiss index after unpickling.
        self._fit_X = Xk
        if self.n_centroids is None:
            self.centroids_ = None
            D, _ = knn_leave_one_out(Xk, k)
            self.train_scores_ = D.mean(axis=1, dtype=np.float64)
        else:
            self.centroids_ = kmeans_centroids(
                Xk,
                int(self.n_centroids),
                niter=int(self.kmeans_niter),
                seed=int(self.seed),
            )
            D, _ = knn(Xk, self.centroids_, 1)
            self.train_scores_ = D[:, 0].astype(np.float64)
        self._sorted_train_scores = np.sort(self.train_scores_)
        self._build_index()
        return self

    def _build_index(self) -> None:
        base = self._fit_X if self.centroids_ is None else self.centroids_
        self._shard = FlatShard(base)
        self.index_ = self._shard.index

    # -- pickling: faiss indexes pickle by serialising, which would store the
    # data twice; drop the index and rebuild it from the arrays instead. -----

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("index_", None)
        state.pop("_shard", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "kept_mask_" in state:
            self._build_index()

    # -- scoring ------------------------------------------------------------

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Anomaly score of each row of X (nq, d): HIGHER = MORE ANOMALOUS.

        kNN mode: mean Euclidean distance to the k nearest kept training
        points.  Centroid mode: Euclidean distance to the nearest centroid.
        Returns float64 (nq,).
        """
        X = self._check_X(X)
        if self.centroids_ is None:
            D, _ = self._shard.search(X, int(self.k))
            return D.mean(axis=1, dtype=np.float64)
        D, _ = self._shard.search(X, 1)
        return D[:, 0].astype(np.float64)

    def kneighbors(
        self, X: np.ndarray, n_neighbors: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest kept training points of each row of X (nq, d), for explanations.

        Returns ``D`` float32 (nq, n_neighbors) Euclidean distances and ``I``
        int64 (nq, n_neighbors) row indices into the KEPT training set
        (``np.flatnonzero(kept_mask_)[I]`` maps back to rows of the original
        X).  ``n_neighbors`` defaults to ``k``.  Also in centroid mode this
        searches the training points, not the centroids (building a
        temporary exact index, O(n_train_ * d) per call).
        """
        X = self._check_X(X)
        n_neighbors = self.k if n_neighbors is None else n_neighbors
        if not is_int(n_neighbors) or not 1 <= n_neighbors <= self.n_train_:
            raise ValueError(
                f"n_neighbors must be an integer in [1, n_train_={self.n_train_}], "
                f"got {n_neighbors!r}"
            )
        if self.centroids_ is not None:
            return knn(X, self._fit_X, int(n_neighbors))
        return self._shard.search(X, int(n_neighbors))

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Express anomaly scores (nq,) as percentiles of the normal training scores.

        Returns float64 (nq,): the percentage (0..100) of ``train_scores_``
        STRICTLY below each score (``np.searchsorted(..., side="left")``), so
        it is non-decreasing in the score, a score tied with training scores
        does not count them, and 100 means above every training score.
        """
        self._check_fitted()
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 1:
            raise ValueError(f"scores must be 1-D (nq,), got shape {s.shape}")
        if np.isnan(s).any():
            raise ValueError("scores contains NaN")
        ref = self._sorted_train_scores
        below = np.searchsorted(ref, s, side="left")
        return 100.0 * below / ref.shape[0]
