"""Progress logging for long runs: images done, rate and what remains."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import apache_beam as beam

LOG = logging.getLogger("dn2")


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


class Progress:
    """Logs "WHAT: done of n, ETA" at most every ``every`` s; warns once if the ETA is long."""

    def __init__(self, n: int, what: str, *, every: float = 30.0, warn_after: float = 120.0,
                 clock: Callable[[], float] = time.monotonic):
        self.n, self.what, self.every, self.warn_after, self.clock = (
            n, what, every, warn_after, clock)
        self.start = self.last = clock()
        self.warned = False

    def update(self, done: int) -> None:
        now = self.clock()
        eta = (now - self.start) / max(done, 1) * (self.n - done)
        if not self.warned and eta > self.warn_after:
            self.warned = True
            LOG.warning("%s: %d of %d done; about %.0f min more (the cost grows with the "
                        "square of the normal set)", self.what, done, self.n, eta / 60)
            self.last = now
        elif now - self.last >= self.every or done == self.n:
            LOG.info("%s: %d of %d done, ETA %.0f s", self.what, done, self.n, eta)
            self.last = now
