"""pipelines.cli: dn2's progress at INFO, other libraries at WARNING unless --verbose."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import configure_logging, main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level
             for name in ("", "dn2", "botocore", "faiss.loader", "apache_beam")}
    yield
    for name, level in saved.items():
        (root if name == "" else logging.getLogger(name)).setLevel(level)


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_info_only_with_verbose(restore_logging, verbose):
    configure_logging(verbose)
    assert logging.getLogger("dn2.anything").isEnabledFor(logging.INFO)
    for name in ("botocore.credentials", "faiss.loader", "apache_beam.runners", "gcsfs",
                 "some.other.library"):
        assert logging.getLogger(name).isEnabledFor(logging.INFO) == verbose, name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name


@pytest.mark.parametrize("verbose", [False, True])
def test_no_faiss_loader_chatter_at_import(verbose):
    code = ("from pipelines.cli import configure_logging; "
            f"configure_logging({verbose}); import torch, faiss")
    err = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stderr
    assert ("faiss.loader" in err) == verbose, err


def test_verbose_is_accepted_by_every_command(restore_logging, capsys):
    assert main(["report", "--verbose", "/nonexistent/results"]) != 0
    assert "unrecognized arguments" not in capsys.readouterr().err
