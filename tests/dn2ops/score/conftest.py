"""Helpers of the set-scoring tests: feature rows of named sets."""

from __future__ import annotations

import numpy as np

# The backbone metadata of the toy 3-d feature rows of these tests.
META = {"backbone": "test", "dim": 3, "preprocessing": {"resize": 1}}


def set_rows(groups: dict[str, np.ndarray], key: str = "lot") -> list[dict]:
    """Feature rows: images named <group>/<j>.png, the group also in a ``lot`` column."""
    rows = []
    for name, X in groups.items():
        for j, x in enumerate(X):
            rows.append({"uri": f"mem://store/{name}/{j:02d}.png", "sha256": f"{name}{j}",
                         "backbone": "test", "dim": len(x),
                         "embedding": [float(v) for v in x], key: name})
    return rows
