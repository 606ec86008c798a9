"""Progress logging for long runs: images done, rate and what remains."""

from __future__ import annotations

import logging
import time

import apache_beam as beam


class LogProgress(beam.DoFn):
    """Passes elements through, logging every ``every_s`` seconds per worker.

    ``total`` (a side input: the number of listed images) turns the rate into
    an estimate of what remains, assuming ``workers`` workers share the load
    evenly (counts are per worker; Beam metrics are not readable in a DoFn).
    """

    def __init__(self, what: str, every_s: float = 5.0, workers: int = 1):
        self.what = what
        self.every_s = every_s
        self.workers = workers

    def setup(self):
        self.done = 0
        self.start = self.last = time.monotonic()

    def process(self, element, total=None):
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.done / (now - self.start)
            msg = f"{self.what}: {self.done} done by this worker, {rate:.1f}/s"
            if total:
                remaining = max(total - self.done * self.workers, 0)
                msg += (f"; ~{remaining} of {total} remain, "
                        f"~{remaining / (rate * self.workers):.0f}s to go")
            logging.getLogger("dn2").info(msg)
        yield element
