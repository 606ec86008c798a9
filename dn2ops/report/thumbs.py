"""Thumbnails for the report: each image read once, shrunk, and embedded as a data: URI."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec

from dn2ops.embed.images import load_image

JPEG_QUALITY = 80
# Concurrent thumbnail reads: object stores answer one small read in tens of
# milliseconds, and a report fetches a few hundred images.
FETCH_WORKERS = 16
# Reasons are shown in a fixed-size placeholder cell.
MAX_REASON_CHARS = 160


@dataclass(frozen=True)
class Thumb:
    """A thumbnail ready to embed (``data_uri``), or the ``reason`` there is none."""

    data_uri: str | None
    reason: str = ""


class Thumbs(dict):
    """uri -> Thumb; a uri that was never loaded gives a placeholder, not a KeyError."""

    def __missing__(self, uri: str) -> Thumb:
        return Thumb(None, "not loaded")


def make_thumbs(uris: Sequence[str], thumb_px: int) -> Thumbs:
    """Read and encode each uri once, concurrently; a failure becomes a reason."""
    if not uris:
        return Thumbs()
    with ThreadPoolExecutor(max_workers=FETCH_WORKERS) as pool:
        thumbs = pool.map(lambda uri: thumb(uri, thumb_px), uris)
        return Thumbs(zip(uris, thumbs, strict=True))


def thumb(uri: str, thumb_px: int) -> Thumb:
    """Read the image at ``uri`` and encode a JPEG fitting ``thumb_px`` x ``thumb_px``."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
        image = load_image(data)
        image.thumbnail((thumb_px, thumb_px))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    # Broad on purpose: one unreadable image (missing, corrupt, permission,
    # a storage client's own exception types) must cost one cell, never the
    # whole report.
    except Exception as exc:  # noqa: BLE001
        return Thumb(None, reason(exc))
    return Thumb("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))


def reason(exc: BaseException) -> str:
    """A short, human-readable reason for a failed thumbnail."""
    if isinstance(exc, FileNotFoundError):
        text = "file not found"
    else:
        text = str(exc) or type(exc).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"
