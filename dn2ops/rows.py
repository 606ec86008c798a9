"""The rows that travel between dn2's stages: an image's key through RunInference, the
feature row written to shards (dn2ops.io.features.feature_schema) and the error row."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class ImageKey(NamedTuple):
    """What travels beside an image through RunInference."""

    uri: str
    sha256: str
    extras: tuple[tuple[str, str], ...]  # manifest columns other than uri


def error_row(uri: str, stage: str, error: BaseException | str) -> dict[str, str]:
    """An input that failed, with the stage it failed in and why."""
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"uri": uri, "stage": stage, "error": reason}


def feature_row(key: ImageKey, features: np.ndarray, backbone: str) -> dict[str, Any]:
    """The row written to feature shards (see dn2ops.io.features.feature_schema); its
    ``embedding`` a float32 array (dim,): 4 bytes a value, a Python float list about 32.
    A copy, so that a row held downstream never pins its whole batch's array."""
    return {"uri": key.uri, "sha256": key.sha256, "backbone": backbone,
            "dim": int(features.shape[0]), "embedding": features.astype(np.float32),
            **dict(key.extras)}
