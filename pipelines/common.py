"""What every entry point shares: turn expected failures into a message and an exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from dn2ops.embed.backbones import WeightsError
from dn2ops.engines.base import EngineError
from dn2ops.engines.torch import DeviceError
from dn2ops.index import IndexError_
from dn2ops.io.features import MetadataMismatch
from dn2ops.io.outputs import OutputError
from dn2ops.io.sources import SourceError
from pipelines.jobs import JobError

# Errors whose message is the whole story for the user: no traceback.
USER_ERRORS = (WeightsError, DeviceError, EngineError, MetadataMismatch, IndexError_,
               OutputError, SourceError, JobError, ValueError)


def guarded(job: Callable[[], object], command: str) -> int:
    """Runs ``job``; a user error prints ``dn2 COMMAND: error: ...`` and returns 1."""
    try:
        job()
    except USER_ERRORS as e:
        logging.getLogger("dn2").debug("failed", exc_info=True)
        print(f"dn2 {command}: error: {e}", file=sys.stderr)
        return 1
    return 0
