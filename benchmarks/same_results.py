"""Compares two dn2 results directories row by row: the check that a change of code left
the scores alone (a refactoring's "behaviour unchanged").

    python -m benchmarks.same_results RESULTS_A RESULTS_B

Joins the ranked tables (anomalies-*.parquet, or groups-*.parquet) on ``uri`` and prints
the rows of each, the uris in one only, the max |score difference|, whether ranks,
percentiles and neighbours are equal, and the same for the error tables. Exits 1 when
anything differs but the run-specific columns: ``index_id`` is a digest of the index's
files, whose rows follow the order in which the embedding stage finished its images (a
thread pool's completion order), so two runs of the same code on the same images give
different ids; it is printed, not compared.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RUN_SPECIFIC = ("index_id",)


def read(results: str, prefix: str) -> pa.Table | None:
    paths = sorted(glob.glob(os.path.join(results, f"{prefix}-*.parquet")))
    return pa.concat_tables(pq.read_table(p) for p in paths) if paths else None


def compare(a: pa.Table, b: pa.Table, key: str) -> dict:
    """What differs between two tables joined on ``key``."""
    da = {r[key]: r for r in a.to_pylist()}
    db = {r[key]: r for r in b.to_pylist()}
    both = sorted(set(da) & set(db))
    out = {"rows": (len(da), len(db)), "only_a": len(set(da) - set(db)),
           "only_b": len(set(db) - set(da))}
    for col in a.column_names:
        if col == key or col not in b.column_names:
            continue
        va, vb = [da[u][col] for u in both], [db[u][col] for u in both]
        if col == "score":
            out["max_abs_score_diff"] = float(np.max(np.abs(np.subtract(va, vb)))) if both else 0.0
        else:
            out[f"{col}_equal"] = va == vb
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    same = True
    for prefix, key in (("anomalies", "uri"), ("groups", "group"), ("errors", "uri")):
        ta, tb = read(args.a, prefix), read(args.b, prefix)
        if ta is None and tb is None:
            continue
        if ta is None or tb is None:
            print(f"{prefix}: only in {'b' if ta is None else 'a'}")
            same = False
            continue
        got = compare(ta, tb, key)
        print(f"{prefix}: {got}")
        same &= (got["only_a"] == got["only_b"] == 0 and got.get("max_abs_score_diff", 0) == 0
                 and all(v for k, v in got.items() if k.endswith("_equal")
                         and k[:-len("_equal")] not in RUN_SPECIFIC))
    print("SAME" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
