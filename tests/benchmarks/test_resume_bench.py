"""benchmarks/resume.py's helper for --floor: the images a kill left unsealed."""

from __future__ import annotations

import hashlib

import numpy as np

from benchmarks.datasets import write_manifest
from benchmarks.resume import unsealed
from dn2ops.io import outputs, pieces


def test_unsealed_is_the_manifest_less_every_sealed_input(tmp_path):
    manifest = str(tmp_path / "in.csv")
    rows = [{"uri": f"/store/{i}.png", "lot": f"L{i % 2}"} for i in range(5)]
    write_manifest(rows, manifest)
    staging = str(tmp_path / "out" / f"{outputs.STAGING_PREFIX}00112233aabbccdd-r1")

    def sealed(i):
        return {"uri": rows[i]["uri"], "sha256": hashlib.sha256(bytes([i])).hexdigest(),
                "backbone": "b", "dim": 2, "embedding": np.ones(2, np.float32)}

    pieces.seal(staging, [sealed(0), sealed(3)], bytes(32))
    pieces.seal(staging, [sealed(4)], bytes(32))
    assert unsealed(manifest, str(tmp_path / "out")) == [rows[1], rows[2]]
    assert unsealed(manifest, str(tmp_path / "nothing")) == rows
