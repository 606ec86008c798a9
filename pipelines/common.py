"""What every entry point shares: the user's mistakes become one line and exit code 1.

A ``dn2ops.errors.UserError`` (a missing input, a flag that does not fit, an index built
with another backbone, ...) says everything the user needs in its message, so it prints
as ``dn2 COMMAND: error: MESSAGE``, without a traceback. Any other exception is a bug in
dn2 or a failure it does not expect: guarded lets it propagate, and Python prints its
traceback and exits with status 1 (tests calling an entry point see the exception
itself). A store's permanent refusal (access denied, no such bucket: dn2ops.io.faults),
in whichever client it surfaces, is the user's to fix too, and prints the same way.
Bad arguments never get here: argparse exits with status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from dn2ops.errors import UserError
from dn2ops.io.faults import permanent_fault


def guarded(job: Callable[[], object], command: str) -> int:
    """Runs ``job``: 0 when it returns; a UserError or a store's permanent refusal prints
    ``dn2 COMMAND: error: ...`` and returns 1 (or the error's ``exit_code``: 3 for a
    BigQuery load that failed after the commit, README "Exit codes"); any other exception
    propagates with its traceback."""
    try:
        job()
    except UserError as e:
        print(f"dn2 {command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except Exception as e:
        reason = permanent_fault(e)
        if reason is None:
            raise
        print(f"dn2 {command}: error: {reason}", file=sys.stderr)
        return 1
    return 0
