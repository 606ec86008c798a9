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
# a model call's rows, which come out together), and a 19-hour run writes a few thousand
# pieces, not one a second.
CALLS_PER_PIECE = 4
SEAL_MIN_S, SEAL_MAX_S, SEAL_FRACTION = 0.5, 60.0, 0.02
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
    its seal). A piece is sealed at ``rows`` rows, when its first row waited
    ``seal_after`` the time this worker has run, and at the end of each bundle."""

    def __init__(self, staging: str, rows: int, secret: bytes):
        self.staging, self.rows, self.secret = staging, max(1, rows), secret

    def setup(self):
        self._started = time.monotonic()

    def start_bundle(self):
        self._held: list[tuple[dict[str, Any], Any, Any]] = []
        self._since = 0.0

    def process(self, row: dict[str, Any], timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam) -> Iterator[WindowedValue]:
        now = time.monotonic()
        if not self._held:
            self._since = now
        self._held.append((row, timestamp, window))
        if (len(self._held) >= self.rows
                or now - self._since >= seal_after(now - self._started)):
            yield from self._seal()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        yield from self._seal()

    def _seal(self) -> Iterator[WindowedValue]:
        if not self._held:
            return
        held, self._held = self._held, []
        seal(self.staging, [row for row, _, _ in held], self.secret)
        for row, timestamp, window in held:
            yield WindowedValue(row, timestamp, (window,))


@dataclasses.dataclass(frozen=True)
class Found:
    """The pieces a rerun adopts: ``pieces`` (uris, verified), the ``images`` they hold
    (rows), the ``runs`` they come from and the ``dropped`` ones (name, why);
    ``others``: staging folders of gone runs with another key that hold pieces (not
    adopted; the next commit deletes them)."""

    pieces: tuple[str, ...] = ()
    images: int = 0
    runs: tuple[str, ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    others: tuple[str, ...] = ()


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
    pieces, images, runs, dropped, others = [], 0, [], [], []
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
            else:
                dropped.append((f"{name}/{PIECES}/{posixpath.basename(s)}", why))
                LOG.warning("not resuming from %s/%s/%s: %s; its images are embedded "
                            "again", name, PIECES, posixpath.basename(s), why)
        if len(pieces) > before:
            runs.append(name)
    return Found(tuple(pieces), images, tuple(runs), tuple(dropped), tuple(others))


def verify(fs: Any, seal_path: str, secret: bytes
           ) -> tuple[tuple[str, int] | None, str | None]:
    """((piece path, rows), None) for a piece that matches its seal, signed with
    ``secret``, else (None, why)."""
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
    return (piece, len(inputs)), None
