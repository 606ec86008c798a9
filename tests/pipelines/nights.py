"""Nightly results directories (``results/dt=YYYY-MM-DD/``, as deploy/ lays them out) made
by real ``dn2 score`` runs over toy feature directories with manifest columns and error
rows, for the BigQuery and glob-reader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dn2ops.config import IndexConfig, JobConfig
from dn2ops.io import features, outputs
from pipelines import jobs
from pipelines.cli import main
from tests.conftest import META, clustered

# Manifest columns the incoming images carry: two BigQuery accepts as they are, one with a
# space and one that clashes (ignoring case) with dn2's ``score``.
EXTRAS = ("label", "class", "my col", "Score")


def write_incoming(directory: Path, X: np.ndarray, start: int, n_errors: int) -> list[str]:
    """A committed features directory of X's rows with EXTRAS and ``n_errors`` error rows
    (as dn2 embed writes them); returns the uris."""
    uris = [f"mem://img/{i:05d}.png" for i in range(start, start + len(X))]
    staging = outputs.new_staging(str(directory))
    fs, path = outputs.fs_and_path(staging)
    fs.makedirs(path, exist_ok=True)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), X.shape[1])
    n = len(X)
    table = pa.table({"uri": uris, "sha256": [f"h{start + i}" for i in range(n)],
                      "backbone": ["toy"] * n, "dim": [X.shape[1]] * n,
                      "embedding": emb.cast(pa.list_(pa.float32())),
                      "label": [str(i % 2) for i in range(n)],
                      "class": [f"c{i % 3}" for i in range(n)],
                      "my col": [f"v{i}" for i in range(n)],
                      "Score": [f"s{i}" for i in range(n)]},
                     schema=features.feature_schema(EXTRAS))
    pq.write_table(table, f"{path}/features-00000-of-00001.parquet")
    pq.write_table(pa.table({"uri": [f"mem://img/bad{start + i}.png" for i in range(n_errors)],
                             "stage": ["decode"] * n_errors,
                             "error": ["not an image"] * n_errors},
                            schema=features.ERROR_SCHEMA),
                   f"{path}/errors-00000-of-00001.parquet")
    outputs.commit(staging, str(directory),
                   {"kind": features.KIND, **META, "dim": X.shape[1],
                    "extra_columns": list(EXTRAS)})
    return uris


# Night -> (images, errors): each night scores its own rows.
NIGHTS = {"2024-06-01": (12, 2), "2024-06-02": (9, 1), "2024-06-03": (7, 0)}


def make_nights(root: Path) -> dict[str, dict]:
    """An index of 60 normal toy rows and one features directory a night (NIGHTS);
    returns night -> {features, scored, errored, uris}."""
    X = clustered(60 + sum(n for n, _ in NIGHTS.values()))
    from tests.conftest import write_features

    write_features(root / "normal", X[:60], [60])
    jobs.build(features_dir=str(root / "normal"), output=str(root / "index"),
               config=JobConfig(index=IndexConfig(k=2)))
    nights, start = {}, 60
    for day, (n, e) in NIGHTS.items():
        uris = write_incoming(root / "incoming" / f"dt={day}", X[start:start + n], start, e)
        nights[day] = {"features": str(root / "incoming" / f"dt={day}"), "scored": n,
                       "errored": e, "uris": uris}
        start += n
    return nights


def score_night(root: Path, day: str, *extra: str, index: bool = True) -> int:
    """``dn2 score`` of one night into root/results/dt=DAY/, as the nightly job runs it
    (``index=False``: without --index, for --group-score covtrace)."""
    return main(["score", "--features", str(root / "incoming" / "dt={partition}"),
                 *(["--index", str(root / "index")] if index else []), "--output",
                 str(root / "results" / "dt={partition}"), "--partition", day, "--explain", "0",
                 *extra])
