"""dn2 embed in several SDK processes (--direct_running_mode multi_processing): the model
is loaded once for the machine and shared (dn2ops.engines.shared), or once a process
with --share-model off; the features equal one process's either way."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from dn2ops.io.features import embeddings, read_table
from pipelines.cli import main

TWO = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
LOADS = re.compile(r"model loads: embedding (\d+)")


def _features(features_dir) -> dict[str, np.ndarray]:
    table = read_table(str(features_dir), "features")
    return dict(zip(table.column("sha256").to_pylist(), embeddings(table), strict=True))


@pytest.fixture(scope="module")
def one_process(digit_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "features"
    assert main(["embed", "--input", str(digit_store / "normal"), "--output", str(out),
                 "--backbone", "efficientnet_lite0"]) == 0
    return _features(out)


@pytest.mark.parametrize("share, loads", [([], 1), (["--share-model", "off"], 2)])
def test_two_processes_load_the_model_once_when_shared(digit_store, tmp_path, one_process,
                                                       share, loads):
    out = tmp_path / "features"
    run = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "embed", "--input", str(digit_store / "normal"),
         "--output", str(out), "--backbone", "efficientnet_lite0", *TWO, *share],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [int(n) for n in LOADS.findall(run.stderr)] == [loads]
    got = _features(out)
    assert got.keys() == one_process.keys() and len(got) > 10
    scale = max(np.abs(v).max() for v in one_process.values())
    assert max(np.abs(got[k] - one_process[k]).max() for k in got) <= 1e-5 * scale
