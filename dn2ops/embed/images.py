"""Decode untrusted image bytes into a uniform RGB ``PIL.Image.Image``.

Every image that enters the DN2 pipeline goes through :func:`load_image`, so
the feature extractor only ever sees 8-bit RGB in display orientation, and
every file that cannot be used fails with an :class:`ImageDecodeError` whose
message tells a person what is wrong with the file.

Given ``min_side`` (the resize target of the preprocessing), it decodes only
the pixels the features need: JPEGs at the smallest DCT scale (1/2, 1/4 or
1/8, libjpeg's draft mode) that keeps the short side >= ``min_side``, and any
image still larger than ``REDUCING_GAP * min_side`` is then shrunk by an
integer factor (box filter, ``Image.reduce``) before the exact resize. A 12 MP
phone JPEG costs ~45 ms instead of ~230 ms this way (benchmarks/throughput.py).
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dn2ops.config import DEFAULT_MAX_PIXELS

__all__ = ["ImageDecodeError", "load_image", "sha256_hex"]

# After reducing, the short side stays >= REDUCING_GAP x the resize target, so the
# exact antialiased resize that follows still averages >= 2 source pixels per
# output pixel (PIL's reducing_gap: 2 or more is "indistinguishable from fair
# resampling in most cases"). Measured effect on features: README, Decoding.
REDUCING_GAP = 2

# Magic prefixes of formats we expect to see. Used only to word errors: a
# file that starts like a PNG but that PIL cannot open is corrupt, not "not
# an image".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)

# Errors PIL's plugins raise on malformed input; none of them is a bug of
# ours, so all become ImageDecodeError.
_DECODER_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    ZeroDivisionError,
    MemoryError,
)

_SNIPPET_CHARS = 40


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be turned into an RGB image.

    The message is a reason a person can act on, e.g. ``"empty file (0
    bytes)"`` or ``"truncated or corrupt image data: image file is
    truncated"``.
    """


def sha256_hex(data: bytes) -> str:
    """Return the lowercase hex SHA-256 digest (64 chars) of ``data``."""
    return hashlib.sha256(data).hexdigest()


def load_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int | None = None) -> Image.Image:
    """Decode ``data`` into an RGB image in EXIF-corrected orientation.

    Args:
        data: the raw bytes of an image file (PNG, JPEG, GIF, TIFF, WebP,
            BMP, ... anything PIL reads).
        max_pixels: refuse images whose header declares more than this many
            pixels (width * height), before any pixel data is decoded. PIL's
            process-wide ``Image.MAX_IMAGE_PIXELS`` also applies, so the
            effective limit is the smaller of the two.
        min_side: None decodes every pixel. Else the image may come back
            smaller, by a JPEG DCT scale and/or an integer reduction, but its
            short side is never below ``min(min_side, the original short
            side)``: pass the resize target of the preprocessing.

    Returns:
        A fully loaded ``PIL.Image.Image`` of mode ``"RGB"``, size
        ``(width, height)`` after EXIF rotation (and reduction, with
        ``min_side``), i.e. an array of shape
        ``(height, width, 3)`` uint8 via ``np.asarray``. Animated images
        yield their first frame. Transparent pixels are composited over
        white; high-bit-depth images are scaled to 8 bits (see
        :func:`_to_rgb`).

    Raises:
        ImageDecodeError: empty input, non-image input (text, HTML, unknown
            binary), truncated or corrupt data, a decompression bomb, or a
            pixel mode we cannot convert.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_image expects bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if min_side is not None and min_side <= 0:
        raise ValueError(f"min_side must be positive, got {min_side}")

    img = _to_rgb(_exif_transpose(_decode(data, max_pixels, min_side)))
    return img if min_side is None else _reduce(img, min_side)


def _decode(data: bytes, max_pixels: int, min_side: int | None) -> Image.Image:
    """Open, check the declared size, (draft,) load: the pixels as stored."""
    # Turning PIL's DecompressionBombWarning into an error makes PIL refuse
    # (instead of merely warn about) images above its own limit. The filter
    # is scoped to this call so that other code's warning settings are left
    # alone. catch_warnings is not thread-safe; if another thread resets the
    # filters meanwhile, the explicit header check below still applies.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data)
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"decompression bomb: declares {width}x{height} = "
                f"{width * height} pixels, limit is {max_pixels}"
            )
        if min_side is not None:
            # JPEG only (the base class's draft does nothing): decode at 1/s scale.
            # Requesting (min_side, min_side) makes PIL pick the largest s in 8, 4,
            # 2, 1 with s <= short side // min_side, so the short side stays >=
            # min_side whatever the orientation. Called before load(), as it must be.
            img.draft(img.mode, (min_side, min_side))
        try:
            # load() inside the try: PIL opens lazily, so truncated pixel
            # data only shows up here.
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"decompression bomb: {exc}") from exc
        except _DECODER_ERRORS as exc:
            raise ImageDecodeError(f"truncated or corrupt image data: {exc}") from exc
    return img


def _reduce(img: Image.Image, min_side: int) -> Image.Image:
    """Shrink ``img`` (RGB) by the largest integer factor keeping the short side
    >= REDUCING_GAP * min_side; unchanged when no factor >= 2 fits."""
    factor = min(img.size) // (REDUCING_GAP * min_side)
    return img.reduce(factor) if factor >= 2 else img


def _open(data: bytes) -> Image.Image:
    """Open ``data`` with PIL (header only), mapping failures to reasons."""
    try:
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(_describe_unidentified(data)) from exc
    except _DECODER_ERRORS as exc:
        raise ImageDecodeError(f"truncated or corrupt image data: {exc}") from exc


def _describe_unidentified(data: bytes) -> str:
    """Explain why bytes that no PIL plugin accepts are not an image."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return (
                f"truncated or corrupt image data: starts like a {name} file "
                f"but the header cannot be parsed ({len(data)} bytes)"
            )
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return (
            "truncated or corrupt image data: starts like a WebP file but the "
            f"header cannot be parsed ({len(data)} bytes)"
        )
    text = _as_text(data)
    if text is not None:
        snippet = text.lstrip()[:_SNIPPET_CHARS]
        more = "..." if len(text.lstrip()) > _SNIPPET_CHARS else ""
        head = text.lstrip()[:256].lower()
        kind = "HTML text" if ("<!doctype html" in head or "<html" in head) else "text"
        return f"not an image: the file holds {kind} (starts with {snippet!r}{more})"
    return (
        f"not an image: unrecognised format ({len(data)} bytes, "
        f"starts with {data[:8].hex(' ')})"
    )


def _as_text(data: bytes) -> str | None:
    """Return the decoded start of ``data`` if it looks like text, else None."""
    head = data[:1024]
    # A multi-byte UTF-8 character cut at the 1024-byte boundary would
    # otherwise count as garbage; "replace" plus a tolerance handles it.
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    if not text:
        return None
    printable = sum(ch.isprintable() or ch in "\t\n\r\f" for ch in text)
    if printable / len(text) < 0.95:
        return None
    return text


def _exif_transpose(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, ignoring unreadable EXIF blocks."""
    try:
        return ImageOps.exif_transpose(img)
    except _DECODER_ERRORS:
        # The pixels decoded fine; a mangled EXIF block only costs us the
        # orientation hint, which is not worth rejecting the image for.
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit ``"RGB"`` (same size).

    Rules:
      * Alpha (``LA``, ``RGBA``, ``PA``, ``La``, ``RGBa``) and palette or
        colour-key transparency (``info["transparency"]``) are composited
        over WHITE. The colour under a fully transparent pixel is undefined
        (often black or leftover data), so dropping alpha would inject
        arbitrary content that a nearest-neighbour detector would score as
        anomalous; white matches how such images (product shots, logos,
        scans) are displayed and keeps the background uniform.
      * 16-bit integer modes (``I;16*``) scale full range to full range:
        ``round(v * 255 / 65535)``, so 65535 -> 255 and 32768 -> 128.
      * 32-bit ``I``: values within [0, 65535] are treated as 16-bit samples
        (that is how PIL represents 16-bit PNG/TIFF data in ``I``) and
        scaled as above; anything else is min/max stretched to [0, 255].
      * 32-bit float ``F``: values within [0, 1] are treated as normalised
        intensities (``v * 255``); anything else is min/max stretched.
        NaN becomes 0 and +-inf are clamped to the finite range.
      * Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) uses
        PIL's own conversion.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scale_16bit(np.asarray(img)))
    if mode == "I":
        values = np.asarray(img).astype(np.int64)
        if values.size and values.min() >= 0 and values.max() <= 0xFFFF:
            return _gray_to_rgb(_scale_16bit(values))
        return _gray_to_rgb(_stretch(values.astype(np.float64)))
    if mode == "F":
        values = np.asarray(img).astype(np.float64)
        finite = values[np.isfinite(values)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        values = np.nan_to_num(values, nan=0.0, posinf=hi, neginf=lo)
        if lo >= 0.0 and hi <= 1.0:
            return _gray_to_rgb(np.rint(values * 255.0).astype(np.uint8))
        return _gray_to_rgb(_stretch(values))
    if mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"unsupported pixel mode {mode!r}: {exc}") from exc


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Map integers in [0, 65535], any shape, to uint8 of the same shape."""
    wide = values.astype(np.uint32)
    # Integer rounding of v * 255 / 65535; fits easily in uint32.
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Linearly map float ``values`` (H, W) from [min, max] to uint8 [0, 255]."""
    if values.size == 0:
        return values.astype(np.uint8)
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo
    if span == 0.0:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / span)).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """Turn a uint8 (H, W) array into an ``"RGB"`` image."""
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")
