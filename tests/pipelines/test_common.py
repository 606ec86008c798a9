"""pipelines.common.guarded: a user's mistake is one line and exit code 1; a bug keeps its
traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dn2ops.errors import ConfigError, UserError
from dn2ops.io.outputs import OutputError
from pipelines.cli import main
from pipelines.common import guarded
from pipelines.finalize import JobError

REPO = Path(__file__).resolve().parents[2]


def _raise(exc: BaseException):
    def job():
        raise exc

    return job


def test_a_job_error_is_a_user_error():
    """JobError (pipelines.finalize): lost rows, too many inputs errored."""
    assert issubclass(JobError, UserError) and issubclass(JobError, RuntimeError)


def test_a_job_that_returns_exits_0(capsys):
    assert guarded(lambda: {"anything": 1}, "embed") == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("exc", [UserError("no such index"), ConfigError("no such index"),
                                 OutputError("no such index")])
def test_a_user_error_prints_one_line_and_returns_1(exc, capsys):
    assert guarded(_raise(exc), "score") == 1
    assert capsys.readouterr().err == "dn2 score: error: no such index\n"


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("backbone"),
                                 FileNotFoundError("a bug"), RuntimeError("a bug")])
def test_any_other_exception_propagates(exc, capsys):
    with pytest.raises(type(exc)) as raised:
        guarded(_raise(exc), "score")
    assert raised.value is exc
    assert "dn2 score: error" not in capsys.readouterr().err


def test_a_missing_input_is_one_line_from_the_real_command(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "embed", "--input",
                           str(missing), "--output", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"dn2 embed: error: --input {missing} does not exist"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_input_in_process(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["embed", "--input", str(missing), "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == f"dn2 embed: error: --input {missing} does not exist\n"


# A ValueError from deep inside dn2ops, where it can only be a bug: before UserError, dn2
# printed it as if the user had made a mistake, without its traceback.
BUG = """
import sys
from dn2ops.io import outputs

def broken(uri):
    raise ValueError("a bug deep in dn2ops")

outputs.fresh_fs_and_path = broken
from pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_bug_deep_in_dn2ops_prints_its_traceback_and_exits_1(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BUG, "embed", "--input", str(tmp_path),
                           "--output", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    # from the guard down to the failing call: where the bug is
    assert 'pipelines/common.py", line' in proc.stderr and "in broken" in proc.stderr
    assert proc.stderr.splitlines()[-1] == "ValueError: a bug deep in dn2ops"
    assert "error:" not in proc.stderr


def test_a_bug_reaches_a_caller_of_main_as_itself(tmp_path, monkeypatch):
    from dn2ops.io import outputs

    def broken(uri):
        raise KeyError("a bug")

    monkeypatch.setattr(outputs, "fresh_fs_and_path", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["embed", "--input", str(tmp_path), "--output", str(tmp_path / "out")])


def test_bad_arguments_still_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["embed", "--output", "o"])
    assert e.value.code == 2
    assert "the following arguments are required: --input" in capsys.readouterr().err
