"""Engines through the dn2 command: features of any engine score against one index."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dn2ops.engines.base import installed
from dn2ops.io.features import embeddings, read_table
from pipelines.cli import main

ENGINES = ["torch"] + [e for e in ("openvino", "onnxruntime") if installed(e)]


def _scores(results_dir) -> dict[str, float]:
    table = read_table(str(results_dir), "anomalies")
    return dict(zip(table.column("uri").to_pylist(), table.column("score").to_pylist(),
                    strict=True))


def _features(features_dir) -> dict[str, np.ndarray]:
    table = read_table(str(features_dir), "features")
    return dict(zip(table.column("uri").to_pylist(), embeddings(table), strict=True))


@pytest.fixture(scope="module")
def torch_index(digit_store, tmp_path_factory):
    """An index built from the normal images' torch features."""
    root = tmp_path_factory.mktemp("engines")
    assert main(["embed", "--input", str(digit_store / "normal"), "--output",
                 str(root / "normal"), "--engine", "torch"]) == 0
    assert main(["build-index", "--features", str(root / "normal"), "--output",
                 str(root / "index")]) == 0
    return root


@pytest.fixture(scope="module")
def embedded(digit_store, torch_index):
    """Each engine's features of the incoming images, scored against the torch index."""
    out = {}
    for engine in ENGINES + ["auto"]:
        features, results = torch_index / f"f-{engine}", torch_index / f"r-{engine}"
        assert main(["embed", "--input", str(digit_store / "incoming.csv"), "--output",
                     str(features), "--engine", engine, "--batch-size", "8"]) == 0
        assert main(["score", "--features", str(features), "--index",
                     str(torch_index / "index"), "--output", str(results)]) == 0
        out[engine] = (features, results)
    return out


@pytest.mark.parametrize("engine", ENGINES + ["auto"])
def test_manifest_records_the_engine_and_the_decode(embedded, engine):
    marker = json.loads((embedded[engine][0] / "_SUCCESS").read_text())
    expected = "onnxruntime" if engine == "auto" else engine
    assert (marker["engine"], marker["decode"]) == (expected, "draft")


@pytest.mark.parametrize("engine", ENGINES[1:])
def test_an_index_of_torch_features_scores_other_engines_features_alike(embedded, engine):
    reference, got = _features(embedded["torch"][0]), _features(embedded[engine][0])
    assert sorted(got) == sorted(reference) and len(got) == 30
    scale = max(np.abs(x).max() for x in reference.values())
    assert max(np.abs(got[u] - reference[u]).max() for u in got) <= 1e-4 * scale
    expected, scores = _scores(embedded["torch"][1]), _scores(embedded[engine][1])
    assert sorted(scores) == sorted(expected)
    np.testing.assert_allclose([scores[u] for u in expected], list(expected.values()),
                               rtol=1e-4, atol=1e-4 * scale)


def test_full_decoding_is_recorded(digit_store, tmp_path):
    assert main(["embed", "--input", str(digit_store / "normal"), "--output",
                 str(tmp_path / "f"), "--engine", "torch", "--decode", "full"]) == 0
    marker = json.loads((tmp_path / "f" / "_SUCCESS").read_text())
    assert (marker["engine"], marker["decode"]) == ("torch", "full")


def test_an_engine_that_cannot_run_fails_before_any_work(digit_store, tmp_path, capsys,
                                                         monkeypatch):
    import dn2ops.engines.base

    monkeypatch.setattr(dn2ops.engines.base, "installed", lambda e: e == "torch")
    assert main(["embed", "--input", str(digit_store / "normal"), "--output",
                 str(tmp_path / "f"), "--engine", "openvino"]) == 1
    assert "--engine openvino needs the openvino package" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
