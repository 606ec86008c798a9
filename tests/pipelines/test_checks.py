"""pipelines.checks: what the jobs refuse before any pipeline starts, on real files."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from dn2ops.config import EmbedConfig, JobConfig, ScoreConfig
from dn2ops.embed.backbones import WeightsError, get_spec
from dn2ops.embed.export import CacheDirError
from dn2ops.engines.base import DeviceError
from dn2ops.errors import ConfigError
from dn2ops.index import build_index
from dn2ops.io import features, outputs
from dn2ops.io.outputs import OutputError
from dn2ops.io.sources import SourceError
from pipelines import checks, options
from tests.conftest import clustered, write_features


def test_check_source_names_the_flag_of_a_missing_source(tmp_path):
    checks.check_source(str(tmp_path))  # a directory
    (tmp_path / "m.csv").write_text("uri\na.png\n")
    checks.check_source(str(tmp_path / "m.csv"))  # a manifest
    checks.check_source(str(tmp_path / "nothing-*.png"))  # a glob: an empty input, not a typo
    with pytest.raises(SourceError, match=f"^--normal {tmp_path}/nope does not exist$"):
        checks.check_source(str(tmp_path / "nope"), "--normal")


# --- dn2 run's OUT_DIR -----------------------------------------------------------------


def test_a_new_or_empty_run_output_is_accepted(tmp_path):
    checks.check_run_output(str(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_text("")  # hidden files are not data
    checks.check_run_output(str(tmp_path / "empty"))


def test_an_earlier_run_output_is_accepted(tmp_path):
    out = tmp_path / "out"
    write_features(out / "normal_features", np.zeros((3, 8), np.float32), [3])
    write_features(out / "features", np.ones((2, 8), np.float32), [2])
    checks.check_run_output(str(out))


def test_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        checks.check_run_output(str(tmp_path / "out"))


def test_another_commands_output_is_refused(tmp_path):
    out = tmp_path / "features"
    write_features(out, np.zeros((3, 8), np.float32), [3])
    with pytest.raises(OutputError, match="holds dn2 features output, not the normal_features, "
                                          "index, features, results directories of dn2 run"):
        checks.check_run_output(str(out))


def test_a_directory_of_other_data_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's data\n")
    with pytest.raises(OutputError, match="is not empty and holds no dn2 run output "
                                          r"\(found 'notes.txt'...\)"):
        checks.check_run_output(str(out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_run_output_whose_step_holds_another_kind_is_refused(tmp_path):
    out = tmp_path / "out"
    write_features(out / "index", np.zeros((3, 8), np.float32), [3])  # features, not an index
    with pytest.raises(OutputError, match="holds dn2 features output, not index"):
        checks.check_run_output(str(out))


# --- features and manifests ------------------------------------------------------------


def test_check_row_dims_against_the_marker(tmp_path):
    write_features(tmp_path / "f", np.zeros((4, 8), np.float32), [2, 2])
    checks.check_row_dims(str(tmp_path / "f"), 8)
    with pytest.raises(features.MetadataMismatch,
                       match=r"have dimension \[8\], but its _SUCCESS marker says 4"):
        checks.check_row_dims(str(tmp_path / "f"), 4)


def test_a_damaged_feature_shard_is_a_user_error_not_a_traceback(tmp_path):
    write_features(tmp_path / "f", np.zeros((4, 8), np.float32), [2, 2])
    shard = sorted((tmp_path / "f").glob("features-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:40])  # truncated after the commit
    with pytest.raises(features.MetadataMismatch, match="is not a readable Parquet file"):
        checks.check_row_dims(str(tmp_path / "f"), 8)


def test_extra_columns_are_a_manifests_own_columns(tmp_path):
    assert checks.extra_columns(str(tmp_path)) == []  # a directory has none
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,label,sha256,lot\na.png,1,x,L1\nb.png,0,y,L2\n")
    # dn2's own feature columns (sha256 here) are not carried: dn2 writes its own
    assert checks.extra_columns(str(manifest)) == ["label", "lot"]
    (tmp_path / "empty.csv").write_text("uri,label\n")
    assert checks.extra_columns(str(tmp_path / "empty.csv")) == []
    (tmp_path / "bad.csv").write_text("path,label\na.png,1\n")
    with pytest.raises(SourceError, match="has no 'uri' column"):
        checks.extra_columns(str(tmp_path / "bad.csv"))


# --- where the pipeline runs -----------------------------------------------------------


@pytest.mark.parametrize("argv, here", [
    ([], True),  # no runner named: Beam's local default
    (["--runner", "DirectRunner"], True),
    (["--runner", options.LOCAL_RUNNER], True),
    (["--runner", "apache_beam.runners.direct.direct_runner.DirectRunner"], True),
    (["--runner", "DataflowRunner"], False),
])
def test_runs_here(argv, here):
    assert checks.runs_here(PipelineOptions(argv)) is here


def test_is_template(tmp_path):
    assert not checks.is_template(options.beam_options([]))
    assert checks.is_template(options.beam_options(
        ["--template_location", str(tmp_path / "t.json")]))


def test_a_template_launch_of_score_with_report_is_refused_first(tmp_path):
    """Refused before the index, the input or the output is looked at."""
    opts = options.beam_options(["--template_location", str(tmp_path / "t.json")])
    with pytest.raises(ConfigError, match="--report needs the results"):
        checks.check_score(str(tmp_path / "no-index"), str(tmp_path / "out"), None,
                           str(tmp_path / "no-features"),
                           JobConfig(score=ScoreConfig(report=True)), opts)
    assert list(tmp_path.iterdir()) == []


def test_check_score_of_features_returns_what_the_job_needs(tmp_path):
    X = clustered(40)
    write_features(tmp_path / "normal", X[:30], [30])
    write_features(tmp_path / "incoming", X[30:], [6, 4], start=30)
    build_index(str(tmp_path / "normal"), str(tmp_path / "index"))
    plan = checks.check_score(str(tmp_path / "index"), str(tmp_path / "out"), None,
                              str(tmp_path / "incoming"), JobConfig(), options.beam_options([]))
    manifest = json.loads((tmp_path / "index" / outputs.MARKER).read_text())
    assert plan.manifest["index_id"] == manifest["index_id"]
    assert (plan.backbone, plan.extras, plan.pool) == ("toy", [], None)
    assert not (tmp_path / "out").exists()  # checked, not written


def test_check_score_refuses_features_of_another_dimension(tmp_path):
    X = clustered(40)
    write_features(tmp_path / "normal", X[:30], [30])
    write_features(tmp_path / "incoming", X[30:, :4], [10])
    build_index(str(tmp_path / "normal"), str(tmp_path / "index"))
    with pytest.raises(features.MetadataMismatch, match="dim: index 8, features 4"):
        checks.check_score(str(tmp_path / "index"), str(tmp_path / "out"), None,
                           str(tmp_path / "incoming"), JobConfig(), options.beam_options([]))


# --- workers and the embedding's preflight ---------------------------------------------


@pytest.mark.parametrize("argv, workers", [
    ([], 1),
    (["--direct_num_workers", "3"], 3),
    (["--direct_num_workers", "0"], os.cpu_count() or 1),  # Beam's "as many as cores"
    (["--runner", "DataflowRunner"], None),  # one SDK process per vCPU
    (["--runner", "DataflowRunner", "--experiments", "no_use_multiple_sdk_containers"], 1),
])
def test_model_workers(argv, workers):
    assert checks.model_workers(options.beam_options(argv)) == workers


def test_preflight_returns_the_plan_every_embedding_takes(tmp_path):
    config = EmbedConfig(backbone="efficientnet_lite0", batch_size=8)
    plan = checks.preflight(config, options.beam_options(["--direct_num_workers", "2"]))
    assert (plan.config, plan.backbone, plan.workers) == (config, "efficientnet_lite0", 2)
    assert re.fullmatch("[0-9a-f]{64}", plan.weights_sha256)
    assert plan.metadata()["dim"] == get_spec("efficientnet_lite0").dim


@pytest.mark.parametrize("config, error, message", [
    (EmbedConfig(backbone="nope"), ConfigError, "unknown backbone 'nope'"),
    (EmbedConfig(backbone="resnet18"), WeightsError, "resnet18"),  # no offline weights
    (EmbedConfig(backbone="efficientnet_lite0", engine="torch", device="cuda"),
     DeviceError, "--device cuda"),
])
def test_preflight_refuses_what_cannot_run(config, error, message, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine's GPU
    with pytest.raises(error, match=message):
        checks.preflight(config, options.beam_options([]))


def test_preflight_names_a_damaged_weights_file(tmp_path):
    import torch

    weights = tmp_path / "resnet18.pt"
    torch.save({"fc.weight": torch.zeros(1000, 512)}, weights)
    weights.write_bytes(weights.read_bytes()[:100_000])  # a copy cut short
    with pytest.raises(WeightsError, match=r"cannot read weights .*resnet18.pt.*\(the file is "
                                           "damaged, truncated or not written by torch.save"):
        checks.preflight(EmbedConfig(backbone="resnet18", weights=str(weights)),
                         options.beam_options([]))


def test_preflight_refuses_a_model_cache_others_can_write(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    config = EmbedConfig(backbone="efficientnet_lite0", engine="onnxruntime",
                         cache_dir=str(cache))
    with pytest.raises(CacheDirError, match=f"{cache} is writable by other users"):
        checks.preflight(config, options.beam_options([]))
    # torch exports nothing; a Dataflow job's workers check their own disk
    checks.preflight(EmbedConfig(backbone="efficientnet_lite0", engine="torch", device="cpu",
                                 cache_dir=str(cache)), options.beam_options([]))
    checks.preflight(config, options.beam_options(["--runner", "DataflowRunner"]))
    assert os.listdir(cache) == []

def test_weights_reason_cuts_torchs_refusal_to_what_a_user_can_act_on():
    torch_says = ("cannot read weights w.pt: UnpicklingError: Weights only load failed. "
                  "... Unsupported global: GLOBAL os.system was not an allowed global ...")
    reason = checks._weights_reason(torch_says)
    assert reason.startswith("cannot read weights w.pt: UnpicklingError: the file holds more "
                             "than tensors (Unsupported global: GLOBAL os.system)")
    assert reason.endswith("torch.save(model.state_dict(), path)")
    assert checks._weights_reason("weights file not found: w.pt") == (
        "weights file not found: w.pt")
