"""Feature transforms applied to normal and query features alike, before kNN.

``none`` is the paper's DN2. ``l2`` scales every feature vector to unit length;
``sqrt-l2`` first takes the signed square root of every value (power normalisation,
which damps the few large activations that dominate Euclidean distances), then scales to
unit length; ``root4-l2`` does the same with the signed fourth root (power 0.25), which
damps them more. ``root4-l2`` is dn2's default (``DEFAULT``): on the full Fashion-MNIST
protocol and on scikit-learn's digits it beats ``none``, ``l2`` and ``sqrt-l2``
(benchmarks/accuracy.py; figures in the README's accuracy section).
"""

from __future__ import annotations

import numpy as np

from dn2ops.errors import ConfigError

TRANSFORMS = ("none", "l2", "sqrt-l2", "root4-l2")
DEFAULT = "root4-l2"
_SQUARE_ROOTS = {"sqrt-l2": 1, "root4-l2": 2}  # of |x|, signed, before the unit length


def check(name: str) -> str:
    if name not in TRANSFORMS:
        raise ConfigError(f"feature transform must be one of {TRANSFORMS}, got {name!r}")
    return name


def apply(x: np.ndarray, name: str) -> np.ndarray:
    """Features (n, d) -> transformed float32 features (n, d); zero rows stay zero."""
    check(name)
    x = np.asarray(x, dtype=np.float32)
    if name == "none":
        return x
    if name in _SQUARE_ROOTS:
        r = np.abs(x)
        for _ in range(_SQUARE_ROOTS[name]):
            np.sqrt(r, out=r)
        # In place, here and below: the same values, one copy of a (large) chunk fewer.
        r = np.copysign(r, x, out=r)
        norms = np.linalg.norm(r, axis=1, keepdims=True)
        r /= np.where(norms > 0, norms, 1)
        return np.ascontiguousarray(r, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1), dtype=np.float32)
