"""pipelines.options: {partition} templating, nightly partition names, underscore flags."""

from __future__ import annotations

import datetime

import pytest

from dn2ops.config import DEFAULT_BACKBONE
from dn2ops.io.features import read_table
from pipelines import options


def _score(*extra: str) -> list[str]:
    return ["--input", "gs://b/images/dt={partition}/", "--index", "gs://b/dn2/index",
            "--output", "gs://b/dn2/results/dt={partition}/", *extra]


def test_partition_replaces_the_placeholder_in_every_path():
    args, beam_args = options.parse("score", _score("--partition", "2026-11-28"))
    assert args.input == "gs://b/images/dt=2026-11-28/"
    assert args.output == "gs://b/dn2/results/dt=2026-11-28/"
    assert args.index == "gs://b/dn2/index"
    assert args.partition == "2026-11-28"
    assert beam_args == []
    args, _ = options.parse("score", ["--features", "/f/dt={partition}", "--index",
                                      "/i/{partition}", "--output", "/o/{partition}",
                                      "--partition", "p1"])
    assert (args.features, args.index, args.output) == ("/f/dt=p1", "/i/p1", "/o/p1")
    args, _ = options.parse("run", ["--normal", "/n/{partition}", "--input", "/in/{partition}",
                                    "--output", "/out/{partition}", "--partition", "x"])
    assert (args.normal, args.input, args.output) == ("/n/x", "/in/x", "/out/x")


def test_nightly_runs_write_next_to_each_other():
    outs = [options.parse("score", _score("--partition", day))[0].output
            for day in ("2026-11-27", "2026-11-28")]
    assert outs[0] != outs[1]
    parents = {o.rstrip("/").rsplit("/", 1)[0] for o in outs}
    assert parents == {"gs://b/dn2/results"}


def test_placeholder_without_partition_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        options.parse("score", _score())
    assert e.value.code == 2
    assert "--input contains {partition} but no --partition" in capsys.readouterr().err


def test_paths_without_placeholder_are_left_alone():
    args, _ = options.parse("score", ["--input", "/a", "--index", "/i", "--output", "/o",
                                      "--partition", "2026-01-01"])
    assert (args.input, args.output) == ("/a", "/o")


def test_resolve_partition_today_and_yesterday():
    day = datetime.date(2026, 3, 1)
    assert options.resolve_partition("today", day) == "2026-03-01"
    assert options.resolve_partition("yesterday", day) == "2026-02-28"
    assert options.resolve_partition("yesterday", datetime.date(2026, 1, 1)) == "2025-12-31"
    for name in ("", "2026-11-28", "Yesterday", "batch-7"):
        assert options.resolve_partition(name, day) == name


def test_yesterday_is_resolved_to_the_utc_date_before_templating():
    before = datetime.datetime.now(datetime.timezone.utc).date()
    args, _ = options.parse("score", _score("--partition", "yesterday"))
    after = datetime.datetime.now(datetime.timezone.utc).date()
    expected = {(d - datetime.timedelta(days=1)).isoformat() for d in (before, after)}
    assert args.partition in expected
    assert args.input == f"gs://b/images/dt={args.partition}/"


def test_underscore_spellings_of_dn2_flags_are_accepted():
    """Dataflow template parameters arrive as --name_with_underscores=value."""
    args, beam_args = options.parse("score", _score(
        "--partition=2026-11-28", "--batch_size=8", "--max_pixels=1000", "--torch_threads=2",
        "--max_error_fraction=0.25", "--temp_location=gs://b/tmp", "--top=5"))
    assert (args.batch_size, args.max_pixels, args.threads) == (8, 1000, 2)  # old name
    assert args.max_error_fraction == 0.25 and args.top == 5
    assert beam_args == ["--temp_location=gs://b/tmp"]  # Beam's own flag is left as it is
    args, _ = options.parse("score", _score("--partition", "p", "--batch_size", "16"))
    assert args.batch_size == 16


def test_underscore_flags_are_still_validated(capsys):
    with pytest.raises(SystemExit):
        options.parse("score", _score("--partition=p", "--batch_size=0"))
    assert "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        options.parse("score", _score("--partition=p", "--no_such_flag=1"))
    assert "unrecognized arguments: --no_such_flag=1" in capsys.readouterr().err


def test_an_s3_endpoint_only_beam_would_use_is_refused(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    flag = ["--s3_endpoint_url", "http://127.0.0.1:9000"]
    with pytest.raises(ValueError, match="export AWS_ENDPOINT_URL=http://127.0.0.1:9000"):
        options.beam_options(flag)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")  # the same for both
    assert options.beam_options(flag).view_as(options.S3Options).s3_endpoint_url == flag[1]
    assert options.beam_options([]).view_as(options.S3Options).s3_endpoint_url is None


def test_reference_sample_defaults_to_a_bounded_sample_and_all_means_every_image():
    build = ["--features", "/f", "--output", "/i"]
    assert options.parse("build-index", build)[0].reference_sample == 20_000
    assert options.parse("build-index", [*build, "--reference-sample", "all"])[0] \
        .reference_sample is None
    assert options.parse("build-index", [*build, "--reference-sample", "500"])[0] \
        .reference_sample == 500
    with pytest.raises(SystemExit):
        options.parse("build-index", [*build, "--reference-sample", "0"])


@pytest.mark.parametrize("command, flags, fraction", [
    ("build-index", [], "auto"), ("run", [], "auto"),  # the command line cleans by default
    ("build-index", ["--clean-fraction", "auto"], "auto"),
    ("build-index", ["--no-clean"], 0.0), ("run", ["--clean-fraction", "0"], 0.0),
    ("build-index", ["--clean-fraction", "0.1"], 0.1),
    ("build-index", ["--group-by", "lot"], "auto"),  # sets too (below 50 sets: not applied)
])
def test_clean_fraction_is_auto_unless_told(command, flags, fraction):
    argv = (["--features", "/f", "--output", "/o"] if command == "build-index"
            else ["--normal", "/n", "--input", "/i", "--output", "/o"])
    index = options.parse(command, [*argv, *flags])[0].config.index
    assert index.clean_fraction == fraction
    assert index.clean_rule == {"auto": "auto", 0.0: "off", 0.1: "fraction"}[fraction]


@pytest.mark.parametrize("value", ["1", "-0.1", "sometimes"])
def test_clean_fraction_takes_auto_or_a_fraction(value, capsys):
    with pytest.raises(SystemExit):
        options.parse("build-index", ["--features", "/f", "--output", "/o",
                                      "--clean-fraction", value])
    assert "--clean-fraction" in capsys.readouterr().err


def test_parse_builds_one_validated_job_config():
    from dn2ops.config import GroupConfig, IndexConfig, SearchConfig

    args, _ = options.parse("run", ["--normal", "/n", "--input", "/i", "--output", "/o",
                                    "--ivf", "64", "--pq", "8", "--batch-size", "16",
                                    "--reads-in-flight", "5", "--stream-shards", "--top", "3",
                                    "--cache-dir", "/c", "--engine-batch", "4"])
    cfg = args.config
    assert cfg.index == IndexConfig(ivf_lists=64, pq_m=8, feature_transform="root4-l2",
                                    clean_fraction="auto")
    assert cfg.embed.batch_size == 16 and cfg.embed.max_in_flight == 5
    assert cfg.embed.cache_dir == "/c" and cfg.embed.engine_batch == 4
    assert cfg.search == SearchConfig(stream_shards=True, device="auto")
    assert cfg.score.top == 3 and cfg.group is None
    args, _ = options.parse("build-index", ["--features", "/f", "--output", "/o",
                                            "--group-by", "lot", "--pool", "max"])
    assert args.config.group == GroupConfig(group_by="lot", pool="max")
    assert args.config.index.feature_transform == "none"  # sets are not transformed


@pytest.mark.parametrize("flags, message", [
    (["--ef-search", "32"], "--ef-search needs --hnsw"),
    (["--ivf", "4", "--kmeans", "2"], "different index modes"),
    (["--group-by", "lot", "--hnsw", "8"], "not available with --group-by"),
])
def test_parse_refuses_what_the_config_refuses(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        options.parse("build-index", ["--features", "/f", "--output", "/o", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_score_takes_the_index_backbone_unless_told(tmp_path):
    """An index built with another backbone than today's default (e.g. before an upgrade)
    keeps scoring: dn2 score embeds with the backbone its index records."""
    index = tmp_path / "index"
    index.mkdir()
    (index / "_SUCCESS").write_text('{"kind": "index", "backbone": "efficientnet_lite0"}')
    argv = ["--input", "/in", "--index", str(index), "--output", "/o"]
    args, _ = options.parse("score", argv)
    assert args.config.embed.backbone == "efficientnet_lite0"
    args, _ = options.parse("score", [*argv, "--backbone", "resnet18"])
    assert args.config.embed.backbone == "resnet18"  # told: checked against the index later
    for missing in (tmp_path / "none", tmp_path / "none/{partition}"):
        args, _ = options.parse("score", ["--input", "/in", "--index", str(missing),
                                          "--output", "/o", "--partition", "p"])
        assert args.config.embed.backbone == DEFAULT_BACKBONE
    args, _ = options.parse("embed", ["--input", "/in", "--output", "/o"])
    assert args.config.embed.backbone == DEFAULT_BACKBONE


def test_score_of_a_lite0_index_without_backbone_equals_naming_it(digit_store, tmp_path):
    from pipelines.cli import main
    from pipelines.finalize import committed_summary

    assert main(["embed", "--input", str(digit_store / "normal"), "--output",
                 str(tmp_path / "nf"), "--backbone", "efficientnet_lite0"]) == 0
    assert main(["build-index", "--features", str(tmp_path / "nf"), "--output",
                 str(tmp_path / "ix")]) == 0
    src = str(digit_store / "incoming.csv")
    for out, extra in (("a", []), ("b", ["--backbone", "efficientnet_lite0"])):
        assert main(["score", "--input", src, "--index", str(tmp_path / "ix"),
                     "--output", str(tmp_path / out), *extra]) == 0
    a = read_table(str(tmp_path / "a"), "anomalies").sort_by("uri")
    b = read_table(str(tmp_path / "b"), "anomalies").sort_by("uri")
    assert a.num_rows == committed_summary(str(tmp_path / "a"))["count_in"] == 30
    assert a.column("score").to_pylist() == b.column("score").to_pylist()
    assert set(a.column("backbone").to_pylist()) == {"efficientnet_lite0"}


def test_report_takes_its_own_flags_and_no_beam_options(capsys):
    args, beam_args = options.parse("report", ["/r"])
    assert beam_args == [] and not hasattr(args, "config")
    assert (args.results_dir, args.output, args.index, args.top, args.sample,
            args.label_column) == ("/r", None, None, 20, 200, "label")
    args, _ = options.parse("report", ["/r", "--output", "/o.html", "--index", "/i", "--top",
                                       "0", "--sample", "3", "--label-column", "y"])
    assert (args.output, args.index, args.top, args.sample, args.label_column) == (
        "/o.html", "/i", 0, 3, "y")
    for argv, message in ((["/r", "--runner", "DataflowRunner"], "unrecognized arguments"),
                          (["/r", "--top", "-1"], "--top: must be >= 0, got -1"),
                          (["/r", "--sample", "x"], "expected a whole number, got 'x'")):
        with pytest.raises(SystemExit) as e:
            options.parse("report", argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, rule", [
    ([], ("fdr", 0.05)), (["--fdr", "0.1"], ("fdr", 0.1)), (["--alpha", "0.001"], ("alpha", 0.001)),
    (["--alpha=1e-4"], ("alpha", 1e-4)),
])
def test_fdr_by_default_or_alpha_instead(flags, rule):
    from dn2ops.config import FlagConfig

    for command, argv in (("score", _score("--partition", "p")),
                          ("run", ["--normal", "/n", "--input", "/i", "--output", "/o"])):
        config = options.parse(command, [*argv, *flags])[0].config
        assert config.score.flags == FlagConfig(*rule)


@pytest.mark.parametrize("flags, message", [
    (["--fdr", "0"], "--fdr: must be in (0, 1), got 0"),
    (["--fdr", "1"], "--fdr: must be in (0, 1), got 1"),
    (["--alpha", "-0.1"], "--alpha: must be in (0, 1), got -0.1"),
    (["--alpha", "often"], "--alpha: expected a number in (0, 1), got 'often'"),
    (["--fdr", "0.1", "--alpha", "0.01"], "--alpha: not allowed with argument --fdr"),
    (["--group-by", "lot", "--group-score", "covtrace", "--alpha", "0.01"],
     "--fdr and --alpha flag by p-values against normal sets"),
])
def test_fdr_and_alpha_refusals(flags, message, capsys):
    argv = _score("--partition", "p", *flags)
    if "covtrace" in flags:
        argv.remove("--index")
        argv.remove("gs://b/dn2/index")
    with pytest.raises(SystemExit) as e:
        options.parse("score", argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_flag_config_refuses_levels_outside_the_open_interval():
    from dn2ops.config import FlagConfig
    from dn2ops.errors import ConfigError

    for rule, level in (("fdr", 0.0), ("alpha", 1.0), ("fdr", True), ("fdr", "0.1")):
        with pytest.raises(ConfigError, match=f"--{rule} must be in \\(0, 1\\)"):
            FlagConfig(rule, level)
    with pytest.raises(ConfigError, match="flag rule must be one of"):
        FlagConfig("bonferroni", 0.05)
