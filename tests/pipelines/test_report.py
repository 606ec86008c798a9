"""``dn2 report``: arguments, output, and a clear error for results that were not committed."""

from pathlib import Path

import pytest

from dn2ops.io import outputs
from pipelines.report import run
from tests.conftest import make_results_dir


@pytest.fixture
def small(tmp_path):
    return make_results_dir(tmp_path, 100)


def test_cli_writes_and_prints(small, capsys, tmp_path):
    out = tmp_path / "r" / "report.html"
    argv = [small["results"], "--output", str(out), "--index", small["index"], "--top", "2"]
    assert run([*argv, "--sample", "3", "--label-column", "label"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and f"{out.stat().st_size:,} bytes" in printed
    assert out.read_text(encoding="utf-8").count('<figure class="sample">') == 3


def test_cli_missing_dir(tmp_path, capsys):
    assert run([str(tmp_path / "nope")]) == 1
    assert "results directory" in (err := capsys.readouterr().err) and "does not exist" in err


def test_cli_refuses_uncommitted_results(small, capsys):
    (Path(small["results"]) / outputs.MARKER).unlink()
    assert run([small["results"]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dn2 report: ") and "has no _SUCCESS marker" in err
    assert not (Path(small["results"]) / "report.html").exists()


def test_cli_index_without_normal_scores(small, capsys):
    (Path(small["index"]) / "normal.parquet").unlink()
    assert run([small["results"], "--index", small["index"]]) == 1
    assert "no normal.parquet" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["x", "--top", "many"], ["x", "--sample", "-1"]])
def test_cli_bad_args(argv):
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 2
