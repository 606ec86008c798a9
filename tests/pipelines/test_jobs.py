"""pipelines.jobs: the jobs on real files (toy feature directories, the local runner)."""

from __future__ import annotations

import posixpath

import apache_beam as beam
import numpy as np
import pytest

from dn2ops.config import IndexConfig, JobConfig, ScoreConfig
from dn2ops.errors import ConfigError
from dn2ops.io import features, outputs, pieces
from pipelines import jobs, options
from pipelines.cli import main
from tests.conftest import brute_scores, clustered, root4_l2, write_features


@pytest.fixture
def toy(tmp_path):
    """normal/ (60 rows) and incoming/ (12 rows) committed toy features."""
    X = clustered(72)
    write_features(tmp_path / "normal", X[:60], [25, 35])
    uris = write_features(tmp_path / "incoming", X[60:], [5, 7], start=60)
    return tmp_path, X[:60], X[60:], uris


def test_run_refuses_a_template_launch_before_any_work(tmp_path, capsys):
    template = ["--template_location", str(tmp_path / "t.json")]
    with pytest.raises(ConfigError, match="dn2 run waits between its steps"):
        jobs.run(normal=str(tmp_path / "n"), input=str(tmp_path / "i"),
                 output=str(tmp_path / "out"), config=JobConfig(),
                 options=options.beam_options(template))
    assert main(["run", "--normal", str(tmp_path / "n"), "--input", str(tmp_path / "i"),
                 "--output", str(tmp_path / "out"), *template]) == 1
    assert capsys.readouterr().err.startswith("dn2 run: error: dn2 run waits between its "
                                              "steps and cannot be launched as a template")
    assert list(tmp_path.iterdir()) == []


def test_build_commits_an_index_and_returns_its_manifest(toy):
    root, *_ = toy
    manifest = jobs.build(features_dir=str(root / "normal"), output=str(root / "index"),
                          config=JobConfig(index=IndexConfig(k=2, shards=2)))
    marker = outputs.require_complete(str(root / "index"), "index")
    assert manifest["index_id"] == marker["index_id"]
    assert (manifest["counts"]["kept"], manifest["shards"]) == (60, 2)


def test_score_of_features_ranks_by_the_brute_force_score(toy):
    root, normal, incoming, uris = toy
    config = JobConfig(index=IndexConfig(k=2, feature_transform="root4-l2"),
                       score=ScoreConfig(top=4))
    jobs.build(features_dir=str(root / "normal"), output=str(root / "index"), config=config)
    summary = jobs.score(index=str(root / "index"), output=str(root / "results"),
                         features_dir=str(root / "incoming"), config=config,
                         options=options.beam_options([]))
    assert (summary["count_in"], summary["scored"], summary["errored"]) == (12, 12, 0)
    assert summary == jobs.finalize.committed_summary(str(root / "results"))
    table = features.read_table(str(root / "results"), "anomalies").sort_by("uri")
    assert table.column("uri").to_pylist() == uris
    expected = brute_scores(root4_l2(incoming), root4_l2(normal), 2)
    np.testing.assert_allclose(table.column("score").to_numpy(), expected, rtol=1e-4)
    top = (root / "results" / "top_anomalies.csv").read_text().splitlines()[1:]
    assert [line.split(",")[5] for line in top] == [uris[i] for i in np.argsort(-expected)[:4]]
    # heatmaps (--explain, default: the --top 4) cannot be made of these features: their
    # images do not exist and their backbone is a toy. The run scores anyway and says why.
    heatmaps = summary["heatmaps"]
    assert (heatmaps["asked"], heatmaps["explained"]) == (4, 0)
    assert sorted(heatmaps["failed"]) == sorted(uris[i] for i in np.argsort(-expected)[:4])
    assert table.column("heatmap_uri").null_count == len(uris)


def _fail(x):
    raise ZeroDivisionError("a worker failed")


def test_a_failed_pipeline_discards_its_staging_folder(tmp_path):
    staging = outputs.new_staging(str(tmp_path / "out"))
    fs, path = outputs.fs_and_path(staging)
    fs.makedirs(path)
    fs.pipe_file(f"{path}/features-00000-of-00001.parquet", b"half written")
    p = beam.Pipeline(options=options.beam_options([]))
    _ = p | beam.Create([1]) | beam.Map(_fail)
    with pytest.raises(ZeroDivisionError, match="a worker failed"):
        jobs._run_staged(p, staging)
    assert not fs.exists(path)


def test_a_failed_pipeline_keeps_its_sealed_pieces(tmp_path):
    """What a rerun resumes from (pipelines.resume) survives a failure; the rest goes."""
    staging = outputs.new_staging(str(tmp_path / "out"), "0123456789abcdef")
    fs, path = outputs.fs_and_path(staging)
    fs.makedirs(f"{path}/{pieces.PIECES}")
    fs.pipe_file(f"{path}/{pieces.PIECES}/p.parquet", b"sealed")
    fs.pipe_file(f"{path}/features-00000-of-00001.parquet", b"half written")
    p = beam.Pipeline(options=options.beam_options([]))
    _ = p | beam.Create([1]) | beam.Map(_fail)
    with pytest.raises(ZeroDivisionError, match="a worker failed"):
        jobs._run_staged(p, staging)
    assert [posixpath.relpath(f, path) for f in fs.find(path)] == [f"{pieces.PIECES}/p.parquet"]


def test_run_returns_false_for_a_template_launch(tmp_path):
    """A template launch's job runs later and commits itself: nothing waits for it."""
    for argv, finished in (([], True), (["--template_location", str(tmp_path / "t")], False)):
        p = beam.Pipeline(options=options.beam_options(argv))
        _ = p | beam.Create([1])
        assert jobs._run(p) is finished
