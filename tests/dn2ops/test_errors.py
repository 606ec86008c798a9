"""dn2ops.errors: every stage's user-facing error is a UserError and keeps its old base, so
callers that caught ``ValueError`` or ``RuntimeError`` still do."""

from __future__ import annotations

import pytest

from dn2ops.embed.backbones import WeightsError, get_spec
from dn2ops.embed.images import ImageDecodeError
from dn2ops.engines.base import DeviceError, EngineError
from dn2ops.errors import ConfigError, UserError
from dn2ops.index import IndexError_
from dn2ops.io.features import MetadataMismatch
from dn2ops.io.outputs import OutputError
from dn2ops.io.sources import SourceError
from dn2ops.report.inputs import NoNormalScores
from dn2ops.score.estimator import NotFittedError
from dn2ops.score.grouping import GroupKeyError


@pytest.mark.parametrize("error, base", [
    (ConfigError, ValueError), (WeightsError, RuntimeError), (DeviceError, RuntimeError),
    (EngineError, RuntimeError), (MetadataMismatch, ValueError), (IndexError_, ValueError),
    (OutputError, ValueError), (SourceError, ValueError), (GroupKeyError, ValueError),
    (NoNormalScores, FileNotFoundError),
])
def test_stage_errors_are_user_errors_and_keep_their_base(error, base):
    assert issubclass(error, UserError) and issubclass(error, base)
    assert str(error("what to fix")) == "what to fix"


@pytest.mark.parametrize("error", [ImageDecodeError, NotFittedError])
def test_errors_that_never_stop_a_command_are_not_user_errors(error):
    """An undecodable image becomes an error row; NotFittedError is a caller's bug. Were
    either to reach the command line, it would be a bug and should show its traceback."""
    assert not issubclass(error, UserError) and issubclass(error, ValueError)


def test_a_refused_configuration_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown backbone 'nope'"):
        get_spec("nope")
