"""Sealed pieces: the features a run has made so far, kept so that a rerun after a crash
embeds only what they lack (dn2 embed, dn2 score --input and so dn2 run, on the local
runner; pipelines.resume).

A run that seals stages into ``DIR/_staging-KEY-RUN/`` (outputs.new_staging): KEY is a
hash of what makes its features (input, backbone, weights' sha256, preprocessing, engine,
device, decode, pixel limit: dn2ops.embed.resume.resume_key), RUN is its own. As feature
rows leave the model, SealPieces writes them, a few hundred at a time, into
``.pieces/NAME.parquet`` (uri, sha256, backbone, dim, embedding), then the piece's seal
``.pieces/NAME.json``: the sha256 of the piece file's bytes, its row count and its
inputs, [uri, sha256] a row, and ``mac``: an HMAC-SHA256 of the rest under the user's
resume key (a secret in dn2's owner-only cache on this machine: pipelines.resume.secret).
The seal is written after the piece, so a piece without a seal (the run died while
writing it) is never used. The output may sit where others can write (a bucket): a
piece and a seal that match each other are not enough, its key must be this user's, so
nobody else can plant the features a rerun copies. The staging folder carries the
run's own ``_LEASE`` (dn2ops.io.lease), renewed while the run lives.

A rerun with the same KEY adopts the pieces of every ``_staging-KEY-*`` folder whose run
is gone (its lease expired, or names a dead process on this host): ``find`` checks each
piece against its seal (checksum, then rows against inputs) and drops, with a warning,
a piece that fails (its images are embedded again); a seal that does not parse is a
piece left unsealed. The staging of a run that still runs is neither adopted nor
deleted (outputs.commit leaves it alone). Pieces stay until a commit into DIR deletes
their staging folder: a rerun that dies too leaves them for the next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.utils.windowed_value import WindowedValue

from dn2ops.io import features, lease, outputs

PIECES = ".pieces"
# A piece is sealed once it holds this many model calls' worth of rows (--batch-size
# each), or once its first row waited SEAL_FRACTION of the time the worker has run,
# between SEAL_MIN_S and SEAL_MAX_S: a crash loses about 2 % of the work done (at least
# the model call under way), and a 19-hour run writes a few thousand pieces, not one a
# second. The wait is watched by a thread of the sealing DoFn, not only as rows arrive:
# rows leave the model a call at a time, and the next row comes only after the next call.
CALLS_PER_PIECE = 4
SEAL_MIN_S, SEAL_MAX_S, SEAL_FRACTION = 0.5, 60.0, 0.02
WATCH_S = 0.05  # how often that thread looks
# Pieces checked at once by a rerun (each a read of the seal and of the piece: on an
# object store, latency more than bandwidth).
_CHECKS_IN_FLIGHT = 16
SCHEMA = features.feature_schema(())

LOG = logging.getLogger("dn2")


def _uri(fs: Any, path: str, like: str) -> str:
    """``path`` as a uri spelled like ``like`` (with its protocol, or a plain path)."""
    return fs.unstrip_protocol(path) if "://" in like else path


def _mac(secret: bytes, record: dict[str, Any]) -> str:
    """The HMAC-SHA256 of a seal's fields (all but ``mac``), canonical JSON."""
    body = json.dumps({k: v for k, v in record.items() if k != "mac"}, sort_keys=True,
                      separators=(",", ":")).encode()
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def seal(staging: str, rows: list[dict[str, Any]], secret: bytes) -> str:
    """Writes feature rows (dicts, embeddings as arrays) as one sealed piece of
    ``staging``: the piece, then its seal, signed with ``secret``. Returns the piece's
    path."""
    buf = pa.BufferOutputStream()
    # No dictionary pages: a piece's values (features, uris, hashes) hardly repeat, and
    # building the dictionary made a write of float features 6x slower.
    pq.write_table(pa.Table.from_batches([features.rows_batch(rows, SCHEMA)]), buf,
                   use_dictionary=False)
    data = buf.getvalue().to_pybytes()
    fs, path = outputs.fs_and_path(staging)
    folder = outputs.join(path, PIECES)
    fs.makedirs(folder, exist_ok=True)  # local disk; object stores have no directories
    name = uuid.uuid4().hex
    fs.pipe_file(outputs.join(folder, f"{name}.parquet"), data)
    record = {"piece": f"{name}.parquet", "sha256": hashlib.sha256(data).hexdigest(),
              "rows": len(rows), "inputs": [[r["uri"], r["sha256"]] for r in rows]}
    record["mac"] = _mac(secret, record)
    fs.pipe_file(outputs.join(folder, f"{name}.json"), json.dumps(record).encode())
    return outputs.join(folder, f"{name}.parquet")


def seal_after(running: float) -> float:
    """Seconds a piece's first row waits at most, in a worker that has run ``running``."""
    return min(SEAL_MAX_S, max(SEAL_MIN_S, SEAL_FRACTION * running))


class SealPieces(beam.DoFn):
    """Feature rows -> the same rows, each handed on once the piece holding it is sealed
    in ``staging`` (so that whatever is written after, the commit included, comes after
    its seal). A piece is sealed at ``rows`` rows, once its first row has waited
    ``seal_after`` the time this worker has run, and at the end of each bundle.

    The wait is kept by a watcher thread: while the bundle's thread is blocked in the
    next model call (it feeds this DoFn too, in the same fused stage), the rows of the
    last call are sealed all the same, so a crash loses only the call under way. Rows the
    watcher sealed are handed on by the bundle's thread (Beam's outputs belong to it),
    with the next row or at the bundle's end; an error of the watcher's seal is raised
    there too."""

    def __init__(self, staging: str, rows: int, secret: bytes):
        self.staging, self.rows, self.secret = staging, max(1, rows), secret

    def setup(self):
        self._started = time.monotonic()
        self._lock = threading.Lock()  # _held, _since, _sealed, _error
        self._sealing = threading.Lock()  # held while a piece is written
        self._held: list[tuple[dict[str, Any], Any, Any]] = []
        self._sealed: list[tuple[dict[str, Any], Any, Any]] = []
        self._since, self._error = 0.0, None
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="dn2-seal", daemon=True)
        self._watcher.start()

    def start_bundle(self):
        with self._sealing, self._lock:  # a failed bundle's leftovers are retried
            self._held, self._sealed, self._error = [], [], None

    def process(self, row: dict[str, Any], timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam) -> Iterator[WindowedValue]:
        now = time.monotonic()
        with self._lock:
            if not self._held:
                self._since = now
            self._held.append((row, timestamp, window))
            due = (len(self._held) >= self.rows
                   or now - self._since >= seal_after(now - self._started))
            held = self._take() if due else []
        if held:
            with self._sealing:
                self._write(held)
        yield from self._handed_on(held)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        with self._sealing:  # waits for a piece the watcher is writing
            with self._lock:
                held = self._take()
            self._write(held)
        yield from self._handed_on(held)

    def teardown(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self._watcher.join()

    def _take(self) -> list:
        held, self._held = self._held, []
        return held

    def _write(self, held: list) -> None:
        if held:
            seal(self.staging, [row for row, _, _ in held], self.secret)

    def _handed_on(self, just_sealed: list) -> Iterator[WindowedValue]:
        """The rows the watcher sealed since the last call, then ``just_sealed``."""
        with self._lock:
            error, self._error = self._error, None
            sealed, self._sealed = self._sealed, []
        if error is not None:
            raise error
        for row, timestamp, window in sealed + just_sealed:
            yield WindowedValue(row, timestamp, (window,))

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):
            with self._sealing:
                with self._lock:
                    now = time.monotonic()
                    due = (self._held and self._error is None
                           and now - self._since >= seal_after(now - self._started))
                    held = self._take() if due else []
                if not held:
                    continue
                try:
                    self._write(held)
                except Exception as e:  # raised by the bundle's thread; its rows go back
                    with self._lock:
                        self._error, self._held = e, held + self._held
                    continue
                with self._lock:
                    self._sealed.extend(held)


@dataclasses.dataclass(frozen=True)
class Found:
    """The pieces a rerun adopts: ``pieces`` (uris, verified) with the sha256 of each
    file's bytes that its seal signs (``checksums``: whoever reads a piece again checks
    it, as the place may be one others can write), the ``images`` they hold (rows), the
    ``runs`` they come from and the ``dropped`` ones (name, why); ``others``: staging
    folders of gone runs with another key that hold pieces (not adopted; the next
    commit deletes them)."""

    pieces: tuple[str, ...] = ()
    images: int = 0
    runs: tuple[str, ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    others: tuple[str, ...] = ()
    checksums: tuple[str, ...] = ()


def staging_prefix(key: str) -> str:
    return f"{outputs.STAGING_PREFIX}{key}-"


def find(directory: str, key: str, own: str, secret: bytes) -> Found:
    """The sealed pieces of the gone runs of ``key`` in ``directory`` (not those of the
    staging folder ``own``, nor of a run that still runs), each checked against its seal
    and the seal against ``secret``; a piece that fails is dropped and logged."""
    fs, path = outputs.fresh_fs_and_path(directory)
    if not fs.exists(path):
        return Found()
    mine = posixpath.basename(own.rstrip("/"))
    pieces, checksums, images, runs, dropped, others = [], [], 0, [], [], []
    for entry in sorted(fs.ls(path, detail=False)):
        name = posixpath.basename(entry.rstrip("/"))
        if not name.startswith(outputs.STAGING_PREFIX) or name == mine:
            continue
        holder = lease.live_holder(_uri(fs, entry.rstrip("/"), directory))
        if holder is not None:
            LOG.info("not resuming from %s: its run still runs (host %s, pid %s)", name,
                     holder.host, holder.pid)
            continue
        folder = outputs.join(entry.rstrip("/"), PIECES)
        seals = sorted(p for p in (fs.ls(folder, detail=False) if fs.exists(folder) else [])
                       if p.endswith(".json"))
        if not name.startswith(staging_prefix(key)):
            if seals:
                others.append(name)
            continue
        before = len(pieces)
        with ThreadPoolExecutor(_CHECKS_IN_FLIGHT) as pool:
            checked = list(pool.map(lambda s: verify(fs, s, secret), seals))
        for s, (piece, why) in zip(seals, checked, strict=True):
            if why is None:
                pieces.append(_uri(fs, piece[0], directory))
                images += piece[1]
                checksums.append(piece[2])
            else:
                dropped.append((f"{name}/{PIECES}/{posixpath.basename(s)}", why))
                LOG.warning("not resuming from %s/%s/%s: %s; its images are embedded "
                            "again", name, PIECES, posixpath.basename(s), why)
        if len(pieces) > before:
            runs.append(name)
    return Found(tuple(pieces), images, tuple(runs), tuple(dropped), tuple(others),
                 tuple(checksums))


def verify(fs: Any, seal_path: str, secret: bytes
           ) -> tuple[tuple[str, int, str] | None, str | None]:
    """((piece path, rows, its bytes' sha256), None) for a piece that matches its seal,
    signed with ``secret``, else (None, why)."""
    try:
        record = json.loads(fs.cat_file(seal_path))
        piece = outputs.join(posixpath.dirname(seal_path), posixpath.basename(record["piece"]))
        want, inputs = str(record["sha256"]), [tuple(i) for i in record["inputs"]]
        mac = str(record["mac"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"its seal is not readable ({type(e).__name__}: {e}): left unsealed"
    if not hmac.compare_digest(mac, _mac(secret, record)):
        return None, ("its seal is not signed with this user's resume key (another user's "
                      "or machine's run, or written by someone else): not trusted")
    try:
        data = fs.cat_file(piece)
    except FileNotFoundError:
        return None, "its piece file is missing"
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        return None, (f"checksum mismatch (the piece's sha256 is {got[:12]}..., its seal "
                      f"says {want[:12]}...): changed or truncated since it was sealed")
    try:
        table = pq.read_table(pa.BufferReader(data), columns=["uri", "sha256"])
    except (pa.ArrowException, OSError) as e:
        return None, f"not a readable Parquet file ({e})"
    if list(zip(*[table.column(c).to_pylist() for c in ("uri", "sha256")],
                strict=True)) != inputs:
        return None, "its rows are not the inputs its seal lists"
    return (piece, len(inputs), got), None
