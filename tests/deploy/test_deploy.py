"""deploy/: the flex template, the Dataflow image, the schedules, against the real code.

Nothing here builds an image or talks to Google Cloud: the files are parsed and checked
against setup.py and pipelines.options, the scripts run against a stub ``gcloud``, and the
Dataflow graph is constructed (not submitted) with the network switched off.
"""

from __future__ import annotations

import functools
import json
import os
import re
import runpy
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from dn2ops.config import DEFAULT_BACKBONE, SearchConfig
from dn2ops.embed.backbones import REGISTRY
from pipelines import options

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCORE_ARGS = ["--input", "gs://dn2-test-bucket/images/dt={partition}/",
              "--index", "gs://dn2-test-bucket/dn2/index",
              "--output", "gs://dn2-test-bucket/dn2/results/dt={partition}/",
              "--partition", "2026-11-28"]


def _metadata() -> dict:
    return json.loads((DEPLOY / "metadata.json").read_text())


def _score_actions() -> dict[str, object]:
    """dn2 score's own options by template parameter name (underscores for dashes)."""
    p = options.parser("score")
    return {a.option_strings[0][2:].replace("-", "_"): a
            for a in p._actions if a.option_strings and a.option_strings[0] != "-h"}


def _setup_py() -> tuple[str, dict[str, str], str]:
    """(BEAM_VERSION, {requirement name: specifier}, python_requires): setup.py run with
    setuptools.setup replaced by a recorder."""
    import setuptools

    seen: dict = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: seen.update(kw)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # setup.py reads README.md
        module = runpy.run_path(str(ROOT / "setup.py"))
    finally:
        setuptools.setup = real
        os.chdir(cwd)
    reqs = dict(re.match(r"([A-Za-z0-9_.\-]+)(.*)", r).groups() for r in seen["install_requires"])
    return module["BEAM_VERSION"], reqs, seen["python_requires"]


def _dockerfile_args() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


# --- the flex template ---------------------------------------------------------------


def test_template_parameters_are_exactly_the_score_options():
    meta = _metadata()
    names = [p["name"] for p in meta["parameters"]]
    assert len(names) == len(set(names))
    actions = _score_actions()
    flags = {n for n, a in actions.items() if a.nargs == 0}  # on/off: no --name=value form
    # refused for a template launch, which nothing waits on (README: BigQuery; the refusal
    # is tests/pipelines/test_load_bigquery.py's)
    refused = {"bigquery_table"}
    assert set(names) == set(actions) - flags - refused
    assert flags == {"report", "stream_shards"}
    for flag in flags:  # said so where a template user reads it
        assert f"--{flag.replace('_', '-')}" in meta["description"]
    beam_names = set(options.PipelineOptions([]).get_all_options())
    for name in names:
        assert re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_]*", name), name
        assert name not in beam_names, f"{name} would shadow the Beam option Dataflow sets"
    required = {p["name"] for p in meta["parameters"] if not p.get("isOptional", False)}
    assert required == {n for n, a in actions.items() if a.required}


def test_template_regexes_accept_what_the_parser_accepts():
    actions = _score_actions()
    samples = {"positive": (["1", "64", "100000"], ["0", "-3", "1.5", "x", ""]),
               "non_negative": (["0", "1", "20", "100"], ["-1", "1.5", "x", ""]),
               "fraction": (["0", "0.05", ".5", "0.999"], ["1", "1.0", "-0.1", "x"]),
               "level": (["0.05", ".5", "0.999", "0.001", "1e-4", "2.5E-3"],
                         ["0", "0.0", "1", "1.0", "-0.1", "x", "", "1e-0", "1e2"]),
               "backbone": ([*REGISTRY, "efficientnet_lite0+efficientnet_lite1",
                             "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2"],
                            ["bogus", "", "resnet50+efficientnet_lite0", "efficientnet_lite0+"])}
    checked = 0
    for param in _metadata()["parameters"]:
        action = actions[param["name"]]
        regexes = [re.compile(r) for r in param.get("regexes", [])]
        if action.choices:
            good, bad = [str(c) for c in action.choices], ["bogus", ""]
        elif action.type is not None and action.type.__name__.lstrip("_") in samples:
            good, bad = samples[action.type.__name__.lstrip("_")]
        else:
            assert not regexes, f"{param['name']}: a regex where the parser takes any string"
            continue
        assert regexes, f"{param['name']} needs a regex like the parser's check"
        for value in good:
            assert all(r.search(value) for r in regexes), (param["name"], value)
            action.type(value) if action.type else None  # and the parser takes it too
        for value in bad:
            assert not all(r.search(value) for r in regexes), (param["name"], value)
        checked += 1
    assert checked >= 8


def test_a_template_launch_argv_parses(monkeypatch):
    """What the flex launcher passes: every parameter as --name=value, then Beam's flags."""
    values = {"input": "gs://b/images/dt={partition}/", "index": "gs://b/dn2/index",
              "output": "gs://b/dn2/results/dt={partition}/", "partition": "2026-11-28",
              "backbone": "efficientnet_lite0", "weights": "gs://b/w.pth", "batch_size": "32",
              "device": "cuda", "max_pixels": "50000000", "torch_threads": "2", "top": "100",
              "max_error_fraction": "0.05"}
    beam = ["--runner=DataflowRunner", "--project=p", "--region=us-central1",
            "--temp_location=gs://b/tmp", "--staging_location=gs://b/staging",
            "--sdk_container_image=us-docker.pkg.dev/p/dn2/dn2:latest"]
    argv = [f"--{k}={v}" for k, v in values.items()] + beam
    args, beam_args = options.parse("score", argv)
    assert args.input == "gs://b/images/dt=2026-11-28/"
    assert (args.batch_size, args.device, args.top, args.max_error_fraction) == (
        32, "cuda", 100, 0.05)
    assert beam_args == beam
    seen = {}
    monkeypatch.setattr("pipelines.cli.main", lambda a: seen.setdefault("argv", a) and 7)
    monkeypatch.setattr(sys, "argv", [str(DEPLOY / "launcher.py"), *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(DEPLOY / "launcher.py"), run_name="__main__")
    assert e.value.code == 7
    assert seen["argv"] == ["score", *argv]


def test_cloudbuild_builds_the_image_and_the_template_spec():
    build = yaml.safe_load((DEPLOY / "cloudbuild.yaml").read_text())
    steps = {s["id"]: s for s in build["steps"]}
    assert steps["image"]["args"][:3] == ["build", "-f", "deploy/Dockerfile"]
    assert steps["image"]["args"][-1] == "."
    assert steps["push"]["args"] == ["push", "${_IMAGE}"]
    spec = steps["template"]["args"]
    assert spec[:4] == ["dataflow", "flex-template", "build", "${_TEMPLATE}"]
    flags = dict(zip(spec[4::2], spec[5::2], strict=True))
    assert flags == {"--image": "${_IMAGE}", "--sdk-language": "PYTHON",
                     "--metadata-file": "deploy/metadata.json"}
    for path in ("deploy/Dockerfile", "deploy/metadata.json"):
        assert (ROOT / path).is_file()


# --- the image -----------------------------------------------------------------------


def test_dockerfile_versions_agree_with_setup_py():
    beam, reqs, python_requires = _setup_py()
    args = _dockerfile_args()
    text = (DEPLOY / "Dockerfile").read_text()
    assert args["BEAM_VERSION"] == beam
    assert reqs["apache-beam"] == "==" + beam  # the container and the package pin one Beam
    assert Version(args["TORCH_VERSION"]) in SpecifierSet(reqs["torch"])
    assert Version(args["TORCHVISION_VERSION"]) in SpecifierSet(reqs["torchvision"])
    assert Version(args["PY_VERSION"]) in SpecifierSet(python_requires)
    # the Makefile's venv (where the tests run) uses the same torch as the image
    makefile = (ROOT / "Makefile").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in makefile
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in makefile
    # the Beam boot comes from the SDK image of the same Beam and Python
    assert "FROM apache/beam_python${PY_VERSION}_sdk:${BEAM_VERSION} AS beam_sdk" in text
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in text
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text
    # the flex template launcher matches the image's Python
    py = args["PY_VERSION"].replace(".", "")
    assert f"/python{py}-template-launcher-base:" in args["LAUNCHER_IMAGE"]
    assert re.search(r"^FROM python:\$\{PY_VERSION\}-slim$", text, flags=re.M)
    assert "torch==${TORCH_VERSION}" in text and '"apache-beam[gcp]==${BEAM_VERSION}"' in text
    assert re.search(r"whl/cu\d+$", args["TORCH_INDEX_URL"])  # a CUDA build of torch


def test_dockerfile_copies_what_exists_and_points_the_launcher_at_it():
    text = (DEPLOY / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M)
    sources = [s for line in copies for s in line.split()]
    assert {"setup.py", "dn2ops", "pipelines", "deploy/launcher.py"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
    py_file = re.search(r"^ENV FLEX_TEMPLATE_PYTHON_PY_FILE=(\S+)$", text, flags=re.M).group(1)
    assert py_file == "/opt/dn2/deploy/launcher.py" and "WORKDIR /opt/dn2" in text
    # weights are baked: the build loads every offline backbone once
    assert "load_backbone(n) for n in ('efficientnet_lite0'" in text
    assert f"export_backbone(n) for n in ('efficientnet_lite0', '{DEFAULT_BACKBONE}')" in text


# --- the Dataflow job ----------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails at once (credential lookups then fall back)."""

    def refuse(self, *a, **k):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("NO_GCE_CHECK", "True")


def test_score_graph_for_dataflow_constructs_offline(no_network):
    """The DataflowRunner translates the whole dn2 score graph, its committing last step
    included; Beam's --dry_run stops it before staging or submitting (and skips the bucket
    checks that need the network)."""
    pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient",
                        reason="needs apache-beam[gcp] (pip install -e '.[dev]')")
    import apache_beam as beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from apache_beam.portability.api import beam_runner_api_pb2

    from dn2ops.embed.plan import EmbedPlan
    from pipelines import finalize, graphs

    image = "us-central1-docker.pkg.dev/dn2-test-project/dn2/dn2:latest"
    gpu = "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
    args, beam_args = options.parse("score", SCORE_ARGS + [
        "--runner", "DataflowRunner", "--project", "dn2-test-project",
        "--region", "us-central1", "--temp_location", "gs://dn2-test-bucket/tmp",
        "--sdk_container_image", image, "--machine_type", "g2-standard-8",
        f"--dataflow_service_options={gpu}", "--dry_run=True"])
    opts = options.beam_options(beam_args)
    assert opts.view_as(GoogleCloudOptions).dataflow_service_options == [gpu]
    p = beam.Pipeline(options=opts)
    assert type(p.runner).__name__ == "DataflowRunner"
    feats, errors, count_in, _, _ = graphs.embed(p, args.input,
                                              EmbedPlan.resolve(args.config.embed))
    staging = args.output + "_staging-test"
    written, decision = graphs.score(graphs.as_batches(feats, []), errors, staging,
                                     index_dir=args.index, partition=args.partition,
                                     extra_columns=[], search=SearchConfig(),
                                     flags=args.config.score.flags)
    graphs.finalize(p, functools.partial(
        finalize.finalize_results, staging=staging, output=args.output,
        partition=args.partition, source=args.input, index_dir=args.index, index_id="x",
        backbone=args.backbone, started=0.0, pipeline_started=0.0, top=args.top),
        count_in=count_in, written=written, counts={"decision": decision})
    p.run().wait_until_finish()  # dry run: translated, pickled, not submitted
    proto = p.runner.proto_pipeline
    names = {t.unique_name for t in proto.components.transforms.values()}
    for step in ("List", "Embed", "Score", "Score/WriteUnranked", "Score/Decide", "Score/Rank",
                 "WriteErrors", "Finalize"):
        assert step in names, step
    images = {beam_runner_api_pb2.DockerPayload.FromString(e.payload).container_image
              for e in proto.components.environments.values()
              if e.urn == "beam:env:docker:v1"}
    assert images == {image}  # the workers run dn2's image


def test_device_preflight_is_local_only_and_template_launches_do_not_wait(monkeypatch):
    import apache_beam as beam
    import torch

    from dn2ops.config import EmbedConfig
    from dn2ops.engines.base import DeviceError
    from pipelines import checks, jobs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = EmbedConfig(backbone="efficientnet_lite0", device="cuda")
    with pytest.raises(DeviceError):
        checks.preflight(cuda, options.beam_options([]))
    # a Dataflow job is launched from a machine without a GPU; its workers check
    checks.preflight(cuda, options.beam_options(["--runner", "DataflowRunner"]))
    # a template launch writes the job graph and returns: the job commits as its last step
    p = beam.Pipeline(options=options.beam_options(["--template_location", "/tmp/t.json"]))
    p | beam.Create([1])

    class Written:
        def wait_until_finish(self):
            pytest.fail("waited for a template job")

    runs = []
    monkeypatch.setattr(beam.Pipeline, "run", lambda self: runs.append(self) or Written())
    assert jobs._run(p) is False and runs == [p]


def test_score_with_cuda_and_no_gpu_fails_before_any_work(digit_store, tmp_path, monkeypatch,
                                                         capsys):
    import apache_beam as beam
    import torch

    from pipelines.cli import main

    feats, index, out = tmp_path / "normal_features", tmp_path / "index", tmp_path / "results"
    assert main(["embed", "--input", str(digit_store / "normal"), "--output", str(feats),
                 "--device", "cpu"]) == 0
    assert main(["build-index", "--features", str(feats), "--output", str(index)]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(beam.Pipeline, "run", lambda self: pytest.fail("ran the pipeline"))
    capsys.readouterr()
    code = main(["score", "--input", str(digit_store / "incoming"), "--index", str(index),
                 "--output", str(out), "--device", "cuda"])
    assert code == 1
    err = capsys.readouterr().err
    # torch (dn2ops.engines.torch) or faiss (dn2ops.index.gpu), whichever is checked first, says so
    assert err.startswith("dn2 score: error: --device cuda was asked for but "), err
    assert not out.exists()


# --- the schedules -------------------------------------------------------------------


@pytest.fixture
def stub_gcloud(tmp_path):
    """A ``gcloud`` on PATH that records each call (one JSON list per line) and succeeds,
    except ``describe`` (nothing exists yet)."""
    log = tmp_path / "gcloud.log"
    stub = tmp_path / "bin" / "gcloud"
    stub.parent.mkdir()
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    "sys.exit(1 if 'describe' in sys.argv else 0)\n")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}",
           "PROJECT": "dn2-test-project", "REGION": "us-central1", "BUCKET": "dn2-test-bucket",
           "SERVICE_ACCOUNT": "dn2-runner@dn2-test-project.iam.gserviceaccount.com"}

    def run(script: str, **settings: str) -> list[list[str]]:
        subprocess.run(["bash", str(DEPLOY / script)], env={**env, **settings}, check=True,
                       cwd=ROOT, capture_output=True)
        return [json.loads(line) for line in log.read_text().splitlines()]

    return run


def test_build_script_submits_the_cloud_build(stub_gcloud):
    calls = stub_gcloud("build.sh")
    submit = next(c for c in calls if c[:2] == ["builds", "submit"])
    assert submit[2] == "."
    assert submit[submit.index("--config") + 1] == "deploy/cloudbuild.yaml"
    subs = submit[submit.index("--substitutions") + 1]
    assert subs == ("_IMAGE=us-central1-docker.pkg.dev/dn2-test-project/dn2/dn2:latest,"
                    "_TEMPLATE=gs://dn2-test-bucket/dn2/templates/dn2-score.json")
    assert any(c[:3] == ["artifacts", "repositories", "create"] for c in calls)


# FlexTemplateRuntimeEnvironment's fields (Dataflow REST API v1b3), and the Beam option
# each sets on the job the launcher submits.
FLEX_ENVIRONMENT = {"serviceAccountEmail": "service_account_email",
                    "tempLocation": "temp_location", "stagingLocation": "staging_location",
                    "sdkContainerImage": "sdk_container_image", "machineType": "machine_type",
                    "maxWorkers": "max_num_workers", "additionalExperiments": "experiments"}


def _launch_argv(body: dict, project: str, region: str) -> list[str]:
    """What the flex template launcher runs deploy/launcher.py with for a launch request:
    each parameter as --name=value, then the environment as Beam flags."""
    launch = body["launchParameter"]
    argv = [f"--{k}={v}" for k, v in launch["parameters"].items()]
    argv += ["--runner=DataflowRunner", f"--project={project}", f"--region={region}",
             "--template_location=gs://launcher/job.json"]
    for key, value in launch["environment"].items():
        for v in value if isinstance(value, list) else [value]:
            argv.append(f"--{FLEX_ENVIRONMENT[key]}={v}")
    return argv


@pytest.mark.parametrize(("limit", "gpu"), [("", "nvidia-l4"), ("0.05", "nvidia-l4"),
                                           ("", "none")],
                         ids=["no-limit", "max-error-fraction", "cpu-workers"])
def test_dataflow_nightly_schedule_launches_the_flex_template_for_yesterday(stub_gcloud, limit,
                                                                            gpu):
    from apache_beam.options.pipeline_options import (
        DebugOptions,
        GoogleCloudOptions,
        StandardOptions,
        WorkerOptions,
    )

    from pipelines import checks

    calls = stub_gcloud("dataflow-nightly.sh", MAX_ERROR_FRACTION=limit, GPU=gpu)
    assert not any(c[:2] == ["run", "jobs"] for c in calls)  # no driver: the job commits
    sched = next(c for c in calls if c[:4] == ["scheduler", "jobs", "create", "http"])
    flag = dict(zip(sched[5::2], sched[6::2], strict=True))
    assert flag["--uri"] == ("https://dataflow.googleapis.com/v1b3/projects/dn2-test-project/"
                             "locations/us-central1/flexTemplates:launch")
    assert flag["--http-method"] == "POST" and flag["--schedule"] == "0 3 * * *"
    assert flag["--time-zone"] == "Etc/UTC" and flag["--headers"] == (
        "Content-Type=application/json")
    assert flag["--oauth-service-account-email"] == (
        "dn2-runner@dn2-test-project.iam.gserviceaccount.com")
    body = json.loads(flag["--message-body"])
    launch = body["launchParameter"]
    assert set(launch) == {"jobName", "containerSpecGcsPath", "parameters", "environment"}
    assert launch["containerSpecGcsPath"] == (  # what build.sh / cloudbuild.yaml write
        "gs://dn2-test-bucket/dn2/templates/dn2-score.json")
    params = launch["parameters"]
    assert set(params) <= {p["name"] for p in _metadata()["parameters"]}
    assert all(isinstance(v, str) for v in params.values())  # the API takes strings
    assert params["partition"] == "yesterday"  # a fixed body: dn2 resolves it at launch
    assert params.get("max_error_fraction", "") == limit
    assert set(launch["environment"]) <= set(FLEX_ENVIRONMENT)

    args, beam_args = options.parse("score", _launch_argv(body, "dn2-test-project",
                                                          "us-central1"))
    yesterday = options.resolve_partition("yesterday")
    assert args.partition == yesterday
    assert args.input == f"gs://dn2-test-bucket/images/dt={yesterday}/"
    assert args.output == f"gs://dn2-test-bucket/dn2/results/dt={yesterday}/"
    assert args.index == "gs://dn2-test-bucket/dn2/index"
    assert args.device == ("cpu" if gpu == "none" else "auto")
    assert args.max_error_fraction == (float(limit) if limit else None)
    opts = options.beam_options(beam_args)
    assert opts.view_as(StandardOptions).runner == "DataflowRunner"
    assert opts.view_as(GoogleCloudOptions).template_location
    assert opts.view_as(GoogleCloudOptions).service_account_email == (
        "dn2-runner@dn2-test-project.iam.gserviceaccount.com")
    worker = opts.view_as(WorkerOptions)
    assert worker.max_num_workers == 4
    if gpu == "none":  # CPU workers: Dataflow's one SDK process per vCPU, each its model
        assert not opts.view_as(DebugOptions).experiments
        assert worker.machine_type == "n1-standard-4"
        assert checks.model_workers(opts) is None
    else:  # one SDK process per GPU worker, its threads sharing the model on the GPU
        assert opts.view_as(DebugOptions).experiments == [
            "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver",
            "no_use_multiple_sdk_containers"]
        assert worker.machine_type == "g2-standard-8"
        assert checks.model_workers(opts) == 1
    assert worker.sdk_container_image == (
        "us-central1-docker.pkg.dev/dn2-test-project/dn2/dn2:latest")


def _cron_command() -> list[str]:
    line = next(ln for ln in (DEPLOY / "dn2-nightly.cron").read_text().splitlines()
                if ln and not ln.startswith("#") and "=" not in ln.split()[0])
    fields = line.split(None, 6)  # m h dom mon dow user command
    assert fields[:5] == ["0", "3", "*", "*", "*"] and fields[5] == "dn2"
    assert "%" not in fields[6]  # cron would turn it into a newline
    return shlex.split(fields[6].split("&&", 1)[1].split(">>")[0])


def _systemd_command() -> list[str]:
    text = (DEPLOY / "dn2-nightly.service").read_text()
    assert "%" not in text.split("ExecStart=", 1)[1].splitlines()[0]
    return shlex.split(re.search(r"^ExecStart=(.+)$", text, flags=re.M).group(1))


@pytest.mark.parametrize("command", [_cron_command, _systemd_command],
                         ids=["cron", "systemd"])
def test_local_nightly_command_scores_yesterdays_partition(command):
    argv = command()
    assert Path(argv[0]).name == "dn2" and argv[1] == "score"
    args, beam_args = options.parse("score", argv[2:])
    assert beam_args == []  # the DirectRunner default (in-process FnApiRunner)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", args.partition)
    assert args.input == f"/data/images/dt={args.partition}/"
    assert args.output == f"/data/dn2/results/dt={args.partition}/"
    timer = (DEPLOY / "dn2-nightly.timer").read_text()
    assert "OnCalendar=*-*-* 03:00:00 UTC" in timer and "Persistent=true" in timer


# --- the README, tried as a new user would -------------------------------------------


def test_readme_deploy_sections_run_commands_that_exist(tmp_path):
    """Runs the README's "Run on Dataflow" and "Nightly on one machine" code blocks in bash,
    with `make`, `gcloud`, the deploy scripts and `.venv/bin/dn2` replaced by recorders;
    every script named exists in the repo and every dn2 call parses."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run on Dataflow"):]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 4
    log = tmp_path / "calls.log"
    recorder = (f"#!{sys.executable}\nimport json, os, sys\n"
                f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0]),"
                " *sys.argv[1:]]) + '\\n')\n")
    scripts = set(re.findall(r"(deploy/[\w.-]+)", section))
    for tool in [".venv/bin/dn2", "bin/make", "bin/gcloud", *scripts]:
        path = tmp_path / tool
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(recorder)
        path.chmod(0o755)
    for script in scripts:
        assert (ROOT / script).is_file(), f"the README names {script}, which does not exist"
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(blocks)], cwd=tmp_path,
                   env=env, check=True, capture_output=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    dn2 = [c[1:] for c in calls if c[0] == "dn2"]
    assert [c[0] for c in dn2] == ["embed", "build-index", "score", "score"]
    for command, *argv in dn2:
        args, beam_args = options.parse(command, argv)  # exits on any unknown flag
        for value in vars(args).values():
            assert "$" not in str(value) and "{partition}" not in str(value), value
        for flag in beam_args:
            assert "$" not in flag, flag
    dataflow = options.beam_options(options.parse("score", dn2[2][1:])[1])
    assert dataflow.get_all_options()["runner"] == "DataflowRunner"
    assert any(c[0] == "dataflow-nightly.sh" for c in calls)
    assert any(c[0] == "build.sh" for c in calls)
