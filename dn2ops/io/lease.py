"""One run owns an output directory at a time: a lease object beside its files.

A run that writes ``DIR`` first creates ``DIR/_LEASE``, a small JSON record (run id,
host, process id, expiry), with a precondition that fails when the object exists:
``ifGenerationMatch=0`` on GCS, ``If-None-Match: *`` on S3, an exclusive create on
local disk (a file written with ``O_EXCL``, then hard-linked to its name: ``link(2)``
fails on an existing name, and the record appears whole). While the run lasts a daemon
thread renews the record every ``ttl / 3`` seconds, each time on a precondition on the
version it last wrote (``ifGenerationMatch=G``, ``If-Match: ETAG``, the content's sha256
under ``flock`` locally), and at the end the run deletes it on the same precondition.

A second run into ``DIR`` finds the record and stops with LeaseHeld, naming the holder.
A record whose holder is gone (expired, or naming this host and a process id that no
longer runs) is taken over, with a log line, by a write on the precondition of the
version that was read: of two runs taking over at once, one wins and the other finds
the winner. ``Lease.previous`` keeps the record taken over (its ``run_id`` is the dead
run's staging folder), for a rerun that adopts what that run left.

Fencing: ``outputs.commit`` calls ``fence(DIR)`` before it touches ``DIR`` and again
right before it writes ``_SUCCESS``. Under a lease held in this process the fence is a
conditional renewal: it fails, and nothing more is written, unless this run still holds
the record, and when it succeeds the lease lasts another ``ttl`` (far longer than one
write). Object stores cannot make a write to ``_SUCCESS`` conditional on another object,
so this is the fence they allow. Without a lease in this process the fence refuses to
commit into a directory that another live run holds.

Every process of one run shares its lease by run id: the pipeline's last step
(pipelines.finalize), on a Beam worker or a Dataflow worker, adopts the lease the job's
process holds; in a template job, where no process waits, it takes the lease itself.

S3-compatible servers may ignore ``If-None-Match`` and grant every create: once a
process and bucket, the first lease is preceded by a probe (a conditional create of one
object twice; the second must fail with 412), and a server that fails it is refused.
Expiry compares wall clocks: hosts that share outputs need synchronised clocks (NTP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

from dn2ops.errors import UserError
from dn2ops.io.conditional import Conflict, S3Store, store_for
from dn2ops.io.faults import StoreError, permanent_fault

LEASE = "_LEASE"
# Seconds a lease lasts unless renewed; renewed every TTL / 3. A crashed run on another
# host blocks its output for at most this long; on the same host not at all (its pid).
TTL = 90.0
# Attempts at taking or renewing before giving up on a contended lease.
_ATTEMPTS = 8

LOG = logging.getLogger("dn2")


class LeaseHeld(UserError, RuntimeError):
    """Another live run holds the output's lease."""


class LeaseLost(UserError, RuntimeError):
    """This run's lease was taken over (it expired) or deleted: it must not commit."""


class LeaseUnsupported(UserError, RuntimeError):
    """The store grants conditional creates it cannot keep (it ignores If-None-Match)."""


# --------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------


def this_host() -> str:
    return socket.gethostname()


def new_run_id() -> str:
    """A run id for a job that stages no Beam output (dn2 run, build-index)."""
    return f"run-{uuid.uuid4().hex[:12]}"


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Record:
    """What ``_LEASE`` holds. ``expires``: epoch seconds (UTC wall clock)."""

    run_id: str
    host: str
    pid: int
    expires: float

    def encode(self) -> bytes:
        return json.dumps({**dataclasses.asdict(self), "expires_at": _iso(self.expires)},
                          indent=1).encode()

    @classmethod
    def decode(cls, data: bytes) -> Record | None:
        """The record, or None when ``data`` is not one (a damaged or foreign object)."""
        try:
            d = json.loads(data)
            return cls(str(d["run_id"]), str(d["host"]), int(d["pid"]), float(d["expires"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float) -> str:
        return (f"run {self.run_id} on host {self.host} (pid {self.pid}), lease valid "
                f"until {_iso(self.expires)} ({self.expires - now:+.0f} s from now)")

    def gone(self, now: float, host: str) -> str | None:
        """Why this record's holder is gone (expired, or a dead process on ``host``), or
        None while it may still run."""
        if self.expires <= now:
            return f"it expired at {_iso(self.expires)} ({now - self.expires:.0f} s ago)"
        if self.host == host and not _pid_runs(self.pid):
            return f"process {self.pid} no longer runs on this host"
        return None


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, as another user
    return True


# --------------------------------------------------------------------------
# The lease
# --------------------------------------------------------------------------


def _held_message(uri: str, holder: Record, now: float) -> str:
    return (f"output {uri} is being written by another dn2 run: {holder.describe(now)}; "
            "wait for it to end or choose another --output (the lease of a run that is "
            "gone expires by itself)")


def _store_error(what: str, path: str, e: BaseException) -> StoreError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return StoreError(f"cannot {what} {path}: the store answered {type(e).__name__}: "
                      f"{reason}; check that the bucket exists and that this account may "
                      "write to it")


class Lease:
    """The lease of ``directory`` for run ``run_id``: acquire(), renew(), release().

    ``record``/``token``: what this run last wrote or adopted; ``previous``: the record
    of a gone holder that acquire() took over (None otherwise); ``owner``: this process
    created the record (it deletes it at the end; an adopter does not); ``lost``: why
    the lease is no longer this run's, once a renewal found out."""

    def __init__(self, directory: str, run_id: str, *, ttl: float = TTL,
                 clock: Callable[[], float] = time.time, host: str | None = None,
                 pid: int | None = None):
        self.fs, self.directory = fsspec.core.url_to_fs(directory)
        self.uri = directory
        self.path = posixpath.join(self.directory.rstrip("/"), LEASE)
        self.store = store_for(self.fs)
        self.run_id, self.ttl, self.clock = run_id, ttl, clock
        self.host, self.pid = host or this_host(), pid or os.getpid()
        self.record: Record | None = None
        self.token: str | None = None
        self.previous: Record | None = None
        self.owner = False
        self.lost: str | None = None
        self._lock = threading.Lock()  # the renewer thread and the fence share the token

    def _fresh(self) -> Record:
        return Record(self.run_id, self.host, self.pid, self.clock() + self.ttl)

    def acquire(self) -> Lease:
        """Creates the record, adopts this run's own, or takes over a gone holder's.
        Raises LeaseHeld naming a live holder."""
        if isinstance(self.store, S3Store) and not self._guard(
                "probe conditional writes on", self.store.honours_if_none_match,
                self.directory):
            raise LeaseUnsupported(
                f"the S3 server of {self.uri} ignores If-None-Match: a second conditional "
                "create of one object succeeded, so dn2 cannot keep two runs from writing "
                "it at once; use an S3 API that honours conditional writes (AWS S3 does)")
        for _ in range(_ATTEMPTS):
            mine = self._fresh()
            try:
                self._held(mine, self._guard("take the lease on", self.store.create, self.path,
                                             mine.encode()))
                self.owner = True
                return self
            except Conflict:
                pass
            found = self._guard("read the lease of", self.store.read, self.path)
            if found is None:
                continue  # released in between: create again
            if self._take(*found, mine):
                return self
        raise LeaseHeld(f"could not take the lease on {self.uri} in {_ATTEMPTS} tries: "
                        "other runs keep taking it; run again")

    def _take(self, data: bytes, token: str, mine: Record) -> bool:
        """Adopts or takes over the record ``data`` (version ``token``); False when it
        changed meanwhile. Raises LeaseHeld when its holder runs."""
        other = Record.decode(data)
        now = self.clock()
        if other is not None and other.run_id == self.run_id:
            # This run's: a retried create whose first answer was lost (this process),
            # or the job's lease, adopted by its last step (another process).
            self._held(other, token)
            self.owner = (other.host, other.pid) == (self.host, self.pid)
            return True
        why = "it is not a lease record" if other is None else other.gone(now, self.host)
        if why is None:
            raise LeaseHeld(_held_message(self.uri, other, now))
        try:
            self._held(mine, self._guard("take over the lease of", self.store.replace, self.path,
                                         mine.encode(), token))
        except Conflict:
            return False  # another taker won, or the holder renewed: look again
        LOG.warning("taking over the lease on %s from %s: %s", self.uri,
                    f"run {other.run_id} on host {other.host} (pid {other.pid})"
                    if other else "a damaged record", why)
        self.previous, self.owner = other, True
        return True

    def _held(self, record: Record, token: str) -> None:
        self.record, self.token, self.lost = record, token, None

    def renew(self) -> None:
        """Extends the lease by ``ttl`` on a precondition on the version this run last
        saw; a version another process of this run wrote is adopted. Raises LeaseLost
        when the record is gone or names another run."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self._lost_message())
            for _ in range(_ATTEMPTS):
                mine = self._fresh()
                try:
                    self._held(mine, self._guard("renew the lease of", self.store.replace,
                                                 self.path, mine.encode(), self.token))
                    return
                except Conflict:
                    pass
                found = self._guard("read the lease of", self.store.read, self.path)
                self.lost = self._not_mine(found)
                if self.lost:
                    raise LeaseLost(self._lost_message())
                self.token = found[1]  # this run's other process renewed it: adopt
        raise LeaseLost(f"could not renew the lease on {self.uri} in {_ATTEMPTS} tries")

    def _not_mine(self, found: tuple[bytes, str] | None) -> str | None:
        """Why the lease ``found`` (data, token) is not this run's, or None if it is."""
        other = Record.decode(found[0]) if found else None
        if other is not None and other.run_id == self.run_id:
            return None
        if found is None:
            return "the lease was deleted"
        return f"it is now held by {other.describe(self.clock())}" if other else (
            "its record was replaced by something else")

    def _lost_message(self) -> str:
        return (f"this run ({self.run_id}) no longer holds the lease on {self.uri}: "
                f"{self.lost}; it stops without committing")

    def still_held(self) -> bool:
        """Whether the store's record still names this run (one read; True when the
        store cannot be read: then the caller's own error says more)."""
        if not self.lost:
            try:
                self.lost = self._not_mine(self.store.read(self.path))
            except Exception:
                return True
        return not self.lost

    def release(self) -> None:
        """Deletes the record if this process took it and this run still holds it (never
        another run's; an adopter leaves it to the process that took it)."""
        if not self.owner:
            return
        with self._lock:
            for _ in range(_ATTEMPTS):
                if self.lost:
                    LOG.warning("not releasing the lease on %s: %s", self.uri, self.lost)
                    return
                try:
                    self.store.delete(self.path, self.token)
                    return
                except Conflict:
                    found = self.store.read(self.path)
                    if self._not_mine(found):
                        return  # gone, or another run's now: not ours to delete
                    self.token = found[1]
                except Exception as e:  # the run's outcome stands; the lease expires
                    LOG.warning("could not release the lease on %s (%s); it expires at %s",
                                self.uri, e, _iso(self.record.expires))
                    return

    def _guard(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, a permanent store failure made a StoreError (clients retry
        transient ones themselves)."""
        try:
            return call(*args)
        except Conflict:
            raise
        except Exception as e:
            # FileNotFoundError: a missing bucket (reads answer None for a missing object)
            if isinstance(e, FileNotFoundError) or permanent_fault(e):
                raise _store_error(what, self.uri, e) from None
            raise


# --------------------------------------------------------------------------
# Held leases of this process: hold(), fence()
# --------------------------------------------------------------------------

_HELD: dict[str, Lease] = {}
_HELD_LOCK = threading.Lock()


def _key(directory: str) -> str:
    fs, path = fsspec.core.url_to_fs(directory)
    return fs.unstrip_protocol(path.rstrip("/"))


class _Renewer(threading.Thread):
    """Renews a lease every ``interval`` seconds until stopped or lost."""

    def __init__(self, lease: Lease, interval: float):
        super().__init__(name=f"dn2-lease-{lease.run_id}", daemon=True)
        self.lease, self.interval, self.stopped = lease, interval, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.lease.renew()
            except LeaseLost as e:
                LOG.error("%s", e)
                return
            except Exception as e:  # a store fault: the next renewal tries again
                LOG.warning("could not renew the lease on %s (%s); trying again in %.0f s",
                            self.lease.uri, e, self.interval)


@contextlib.contextmanager
def hold(directory: str, run_id: str, *, ttl: float = TTL) -> Iterator[Lease | None]:
    """Holds ``directory``'s lease for run ``run_id`` while the block runs: acquired (or
    adopted, if this run holds it already), renewed by a daemon thread, released at the
    end by the process that created it. A block that fails after the lease was lost
    raises LeaseLost (from its own error). Yields None on a filesystem dn2 cannot lease.
    """
    key = _key(directory)
    with _HELD_LOCK:
        held = _HELD.get(key)
    if held is not None and held.run_id == run_id:
        yield held  # nested: this process holds it for this run already
        return
    lease = Lease(directory, run_id, ttl=ttl)
    if lease.store is None:
        LOG.warning("%s: dn2 takes leases on local disk, S3 and GCS only; make sure one "
                    "run at a time writes it", directory)
        yield None
        return
    lease.acquire()
    renewer = _Renewer(lease, ttl / 3)
    with _HELD_LOCK:
        _HELD[key] = lease
    renewer.start()
    try:
        yield lease
    except Exception as e:
        renewer.stopped.set()
        if not lease.still_held():
            raise LeaseLost(lease._lost_message()) from e
        raise
    finally:
        renewer.stopped.set()
        with _HELD_LOCK:
            _HELD.pop(key, None)
        lease.release()


def fence(directory: str) -> None:
    """Called by a commit before it changes ``directory``: renews the lease this process
    holds on it (LeaseLost if it is no longer this run's), or, holding none, refuses a
    directory whose lease a live run holds (LeaseHeld)."""
    with _HELD_LOCK:
        held = _HELD.get(_key(directory))
    if held is not None:
        held.renew()
        return
    check_free(directory)


def check_free(directory: str) -> None:
    """Raises LeaseHeld when a live run that is not one of this process's holds
    ``directory``'s lease."""
    with _HELD_LOCK:
        if _key(directory) in _HELD:
            return
    other = live_holder(directory)
    if other is not None:
        raise LeaseHeld(_held_message(directory, other, time.time()))


def live_holder(directory: str) -> Record | None:
    """The record of the live run that holds ``directory``'s lease, or None (no lease, a
    gone holder, a damaged record, a filesystem dn2 does not lease). Also asked of a
    run's staging folder, whose own lease says whether that run still runs."""
    probe = Lease(directory, run_id="")
    if probe.store is None:
        return None
    found = probe._guard("read the lease of", probe.store.read, probe.path)
    other = Record.decode(found[0]) if found else None
    if other is not None and other.gone(time.time(), probe.host) is None:
        return other
    return None
