"""Imported by the pipeline of tests/dn2ops/test_exit.py, in its launcher and in each SDK
worker that unpickles ``Probe``: records at the process's exit whether the objects alive
then were frozen (dn2ops.skip_final_collection), in DN2_EXIT_PROBE/PID.

dn2ops is imported after the recorder is registered: atexit runs its handlers last in,
first out, so dn2ops' freeze (where it registers one) has run when the recorder runs.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys

import apache_beam as beam


def _record() -> None:
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    with open(os.path.join(os.environ["DN2_EXIT_PROBE"], str(os.getpid())), "w") as f:
        f.write(f"{getattr(spec, 'name', None)} {gc.get_freeze_count()}")


atexit.register(_record)

import dn2ops  # noqa: E402,F401  (after the recorder: see above)


class Probe(beam.DoFn):
    def process(self, x):
        yield os.getpid()
