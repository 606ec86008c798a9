"""dn2ops.skip_final_collection in the processes it is meant for: Beam's SDK workers
(registered when they import dn2ops) and the ``dn2`` program after a job; not in any
other program that imports dn2ops, nor when ``pipelines.cli.main`` is called from Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PIPELINE = """
import os
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from tests.dn2ops.exit_probe import Probe
seen = os.environ["DN2_EXIT_SEEN"]
with beam.Pipeline(options=PipelineOptions(["--direct_num_workers", "2",
                                            "--direct_running_mode", "multi_processing"])) as p:
    (p | beam.Create(list(range(8))) | beam.Reshuffle() | beam.ParDo(Probe())
       | beam.Map(lambda pid: open(os.path.join(seen, str(pid)), "w").close()))
"""


def _records(folder: Path) -> dict[int, tuple[str, int]]:
    out = {}
    for f in folder.iterdir():
        name, count = f.read_text().split()
        out[int(f.name)] = (name, int(count))
    return out


def test_sdk_workers_freeze_at_exit_and_the_launcher_does_not(tmp_path):
    # the workers share the launcher's stdout, where their lines can interleave: each
    # names itself by a file of its own instead
    (tmp_path / "probe").mkdir()
    (tmp_path / "seen").mkdir()
    env = dict(os.environ, DN2_EXIT_PROBE=str(tmp_path / "probe"),
               DN2_EXIT_SEEN=str(tmp_path / "seen"))
    proc = subprocess.run([sys.executable, "-c", PIPELINE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workers = {int(f.name) for f in (tmp_path / "seen").iterdir()}
    records = _records(tmp_path / "probe")
    assert workers and workers <= set(records) and os.getpid() not in records
    launcher = set(records) - workers
    assert len(launcher) == 1, records
    for pid in workers:  # python -m apache_beam.runners.worker.sdk_worker_main
        name, frozen = records[pid]
        assert name == "apache_beam.runners.worker.sdk_worker_main" and frozen > 0, records
    assert records[launcher.pop()] == ("None", 0)


OBSERVED = """
import atexit, gc, os, sys
atexit.register(lambda: print("frozen", gc.get_freeze_count() > 0))
from pipelines import cli
sys.argv = ["dn2", "--help"]
sys.exit({call})
"""


@pytest.mark.parametrize("call, frozen", [("cli.console()", True),
                                          ("cli.main(sys.argv[1:])", False)])
def test_the_dn2_program_freezes_at_exit_and_main_does_not(call, frozen):
    proc = subprocess.run([sys.executable, "-c", OBSERVED.format(call=call)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"frozen {frozen}"
    assert "usage: dn2" in proc.stdout
