"""Resuming an embedding after a crash: the features of the sealed pieces a dead run left
(dn2ops.io.pieces) are copied, not embedded again.

An image is resumed when its (uri, sha256) is in an adopted piece: an image changed
since the crash has another sha256 and is embedded again; one no longer listed is never
looked up, so its row is dropped. Images that errored before the crash are not in any
piece (pieces hold feature rows only): they are tried again. Each worker loads the
pieces' keys once (``load_resumed``: 32 bytes and a location an image); PrepareImages
hashes an image before decoding it and hands a resumed one on as (key, PieceLocation),
whose row reuse.CopyFeatures copies from the piece under this run's manifest columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dn2ops.embed.plan import EmbedPlan
from dn2ops.embed.reuse import Known, Location
from dn2ops.io import outputs


@dataclasses.dataclass(frozen=True)
class Resume:
    """What an embedding seals into and resumes from (picklable: it travels to workers).

    ``staging``: the run's staging folder, whose ``.pieces/`` the new rows are sealed in;
    ``pieces``: the adopted pieces (uris, checked by dn2ops.io.pieces.find), and
    ``piece_sha256`` the sha256 of each one's bytes, which a worker that copies from it
    checks again (the place may be one others can write);
    ``piece_rows``: rows a piece holds before it is sealed; ``secret``: the user's resume
    key, which signs the seals (dn2ops.io.pieces; the local runner only: it never leaves
    this machine)."""

    staging: str
    pieces: tuple[str, ...] = ()
    piece_rows: int = 256
    piece_sha256: tuple[str, ...] = ()
    secret: bytes = dataclasses.field(default=b"", repr=False)


class PieceLocation(Location):
    """Where a resumed image's row is: adopted piece index and row within it."""

    __slots__ = ()


def resume_key(plan: EmbedPlan, *, input: str, engine: str, device: str) -> str:
    """16 hex digits naming what makes a run's features: the input, the backbone (name,
    dim, preprocessing), the weights' sha256, the engine and device they ran on (resolved
    here: ``auto`` is not a choice), the decode and the pixel limit. Runs with another
    key never adopt each other's pieces. The output is not in it: the pieces lie in it."""
    what = {"input": input, **plan.metadata(), "engine": engine, "device": device,
            "decode": plan.config.decode, "max_pixels": plan.config.max_pixels}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def pair_digest(uri: str, sha256: str) -> str:
    """The key an image is resumed by: sha256 (hex) of its uri and its bytes' sha256."""
    return hashlib.sha256(f"{uri}\n{sha256}".encode()).hexdigest()


def load_resumed(pieces: tuple[str, ...]) -> Known:
    """The (uri, sha256) keys of the adopted pieces, each with its PieceLocation."""
    digests, shards, rows = [], [], []
    for i, uri in enumerate(pieces):
        fs, path = outputs.fs_and_path(uri)
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["uri", "sha256"])
        pairs = zip(t.column("uri").to_pylist(), t.column("sha256").to_pylist(), strict=True)
        digests += [pair_digest(u, s) for u, s in pairs]
        shards.append(np.full(t.num_rows, i, np.int32))
        rows.append(np.arange(t.num_rows, dtype=np.int64))
    if not digests:
        return Known(np.zeros(0, "S32"), np.zeros(0, np.int32), np.zeros(0, np.int64))
    raw = np.frombuffer(bytes.fromhex("".join(digests)), "S32")
    return Known(raw, np.concatenate(shards), np.concatenate(rows))


def find(resumed: Known | None, uri: str, sha256: str) -> Any:
    """The PieceLocation of an image's row in the adopted pieces, or None."""
    found = resumed.find(pair_digest(uri, sha256)) if resumed is not None else None
    return PieceLocation(*found) if found is not None else None
