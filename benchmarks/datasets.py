"""Helpers to turn real datasets (Fashion-MNIST) into image stores.

The pipeline reads images by URI from a manifest, so a dataset shipped as
IDX arrays is materialised once as one PNG per image plus a CSV manifest.
Every path may be a local path or any fsspec URL (``memory://``, ``gs://``).
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import os
import posixpath
from collections.abc import Sequence
from typing import Any

import fsspec
import fsspec.core
import numpy as np
from PIL import Image

__all__ = [
    "FASHION_MNIST_CLASSES",
    "load_fashion_mnist",
    "phone_photo",
    "read_idx",
    "write_photo_store",
    "write_manifest",
    "write_png_store",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Third byte of the IDX magic number -> big-endian element type.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"

_FASHION_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (as used by MNIST), optionally gzip-compressed.

    Layout: 2 zero bytes, a dtype code, the number of dimensions ``ndim``,
    then ``ndim`` big-endian uint32 sizes, then the data in C order.
    Compression is detected from the gzip magic bytes, not the file name.

    Args:
        path: local path or fsspec URL.

    Returns:
        An array of shape ``(d0, ..., d{ndim-1})`` in native byte order
        (uint8 for MNIST images and labels), writable.

    Raises:
        ValueError: bad magic number, unknown dtype code, or a data size
            that does not match the declared dimensions.
    """
    with fsspec.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip stream: {exc}") from exc

    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file: magic number {raw[:4].hex()} "
            "must start with two zero bytes"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: unknown IDX dtype code 0x{code:02x}; expected one of "
            + ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        )
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need "
            f"{header_len} bytes, file has {len(raw)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise ValueError(
            f"{path}: IDX data size mismatch: dims {dims} of {dtype.name} need "
            f"{expected} bytes, found {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    # astype copies: native byte order and a writable array independent of
    # the (read-only) bytes buffer.
    return data.astype(dtype.newbyteorder("="))


def load_fashion_mnist(
    root: str = "/usr/share/datasets/fashion-mnist", split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Load one Fashion-MNIST split from its four standard ``.gz`` IDX files.

    Args:
        root: directory (local path or fsspec URL) holding
            ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).

    Returns:
        ``(images, labels)``: uint8 of shape (N, 28, 28) and uint8 of shape
        (N,), labels indexing :data:`FASHION_MNIST_CLASSES`.

    Raises:
        ValueError: unknown split, or files with unexpected shapes.
        FileNotFoundError: a file is missing (says how to install it).
    """
    if split not in _FASHION_PREFIX:
        raise ValueError(
            f"split must be one of {sorted(_FASHION_PREFIX)}, got {split!r}"
        )
    prefix = _FASHION_PREFIX[split]
    fs, base = fsspec.core.url_to_fs(root)
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte.gz"
        if not fs.exists(posixpath.join(base, name)):
            raise FileNotFoundError(
                f"Fashion-MNIST file {name} not found under {root}; install it "
                "with `apt-get install dataset-fashion-mnist` or pass root= "
                "pointing at a directory that holds it"
            )
        paths.append(root.rstrip("/") + "/" + name)

    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{paths[0]}: expected uint8 (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"{paths[1]}: expected uint8 ({images.shape[0]},), "
            f"got {labels.dtype} {labels.shape}"
        )
    return images, labels


def write_png_store(
    images: np.ndarray,
    names: Sequence[str],
    root: str,
    *,
    fs: fsspec.AbstractFileSystem | None = None,
) -> list[str]:
    """Write each image as a PNG file under ``root``.

    Idempotent: root is listed once up front, and a file that already exists
    with exactly the size of the freshly encoded PNG is not rewritten. PNG
    encoding is deterministic, so on a rerun every file is skipped with one
    listing call instead of one write per image. The check is by size only
    (reading every file back would defeat the purpose), so a different image
    that happens to encode to the same byte count would not be replaced;
    write to a fresh root when the source data changes.

    Args:
        images: uint8 array of shape (N, H, W) (grayscale) or (N, H, W, 3)
            (RGB).
        names: N relative paths under root, e.g. ``"train/3/00017.png"``;
            ``".png"`` is appended when missing.
        root: local directory or fsspec URL (``memory://x``, ``gs://b/p``).
        fs: filesystem to write with; defaults to the one ``root`` names.

    Returns:
        The N written URIs, in input order, spelled like ``root`` (a local
        root gives local paths, ``memory://x`` gives ``memory://x/...``);
        with an explicit ``fs`` and a bare path, protocol-qualified URIs.

    Raises:
        ValueError: wrong dtype/shape, length mismatch, or a name that is
            absolute, escapes root via ``..``, or repeats.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(
            f"images must have shape (N, H, W) or (N, H, W, 3), got {images.shape}"
        )
    if len(names) != len(images):
        raise ValueError(f"got {len(images)} images but {len(names)} names")

    rel_names = [_check_name(name) for name in names]
    if len(set(rel_names)) != len(rel_names):
        raise ValueError(
            "names must be unique; later images would overwrite earlier ones"
        )

    if fs is None:
        fs, base = fsspec.core.url_to_fs(root)
        uri_base = root.rstrip("/")
    else:
        base = fs._strip_protocol(root)
        # A bare path handed with an explicit filesystem would not say which
        # filesystem it lives on; qualify it so the URIs can be reopened.
        uri_base = root.rstrip("/") if "://" in root else fs.unstrip_protocol(base)
    base = base.rstrip("/")
    existing = _sizes_under(fs, base)

    uris = []
    made_dirs: set[str] = set()
    for image, rel in zip(images, rel_names, strict=True):
        path = f"{base}/{rel}"
        png = _encode_png(image)
        if existing.get(path) != len(png):
            parent = posixpath.dirname(path)
            if parent not in made_dirs:
                fs.makedirs(parent, exist_ok=True)
                made_dirs.add(parent)
            fs.pipe_file(path, png)
        uris.append(f"{uri_base.rstrip('/')}/{rel}")
    return uris


def write_manifest(rows: list[dict[str, Any]], path: str) -> None:
    """Write ``rows`` as a UTF-8 CSV manifest at ``path`` (local or fsspec URL).

    Columns: ``uri`` first, then every other key in order of first
    appearance across rows; a key missing from a row is written empty.

    Raises:
        ValueError: a row has no ``uri``.
    """
    columns = ["uri"]
    for i, row in enumerate(rows):
        if "uri" not in row:
            raise ValueError(f"manifest row {i} has no 'uri': {row!r}")
        columns.extend(key for key in row if key not in columns)

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)

    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = posixpath.dirname(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(fs_path, buf.getvalue().encode("utf-8"))


def _check_name(name: str) -> str:
    """Validate a relative store name and give it a ``.png`` suffix."""
    rel = name.replace("\\", "/")
    if not rel or rel.startswith("/") or "://" in rel:
        raise ValueError(f"name must be a non-empty relative path, got {name!r}")
    if ".." in rel.split("/"):
        raise ValueError(f"name must stay under root (no '..'), got {name!r}")
    return rel if rel.lower().endswith(".png") else rel + ".png"


def _sizes_under(fs: fsspec.AbstractFileSystem, base: str) -> dict[str, int]:
    """Map every file path under ``base`` to its size; empty if base is absent."""
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    return {
        # Normalise to the un-prefixed form we build paths in.
        fs._strip_protocol(path): int(info.get("size") or 0)
        for path, info in found.items()
        if info.get("type") != "directory"
    }


def _encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) or (H, W, 3) array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


# A phone camera's 12 MP frame (4:3), stored landscape; portrait shots carry EXIF
# orientation 6 (rotate 90 degrees clockwise to display), as phones write them.
PHONE_SIZE = (4032, 3024)
_EXIF_ORIENTATION = 0x0112


def phone_photo(index: int, *, size: tuple[int, int] = PHONE_SIZE, seed: int = 0
                ) -> Image.Image:
    """A phone-sized RGB photo made from scikit-learn's two sample photographs.

    Image ``index`` takes a random crop (at least half of each side) of one of
    the photos, mirrors it at random, scales it up to ``size`` (width, height)
    with bicubic interpolation and adds Gaussian sensor noise (sigma 3 levels),
    so that JPEG files of it cost what camera files cost to decode.
    """
    rng = np.random.default_rng([seed, index])
    photos = _sample_photos()
    src = photos[index % len(photos)]
    h, w = src.shape[:2]
    ch, cw = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = src[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    big = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BICUBIC))
    noisy = big + rng.normal(0.0, 3.0, big.shape).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=1)
def _sample_photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)  # china.jpg, flower.jpg: 427 x 640 RGB


def write_photo_store(root: str, n: int, *, size: tuple[int, int] = PHONE_SIZE,
                      quality: int = 90, seed: int = 0, workers: int = 1) -> list[str]:
    """Writes ``n`` phone-sized JPEGs ``photo-00000.jpg``... under local directory ``root``.

    Every fourth photo is tagged EXIF orientation 6 (a portrait shot). Files
    already there are kept (the photos are deterministic), so a rerun costs a
    listing; ``workers`` threads make the missing ones. Returns the n paths in order.
    """
    import concurrent.futures

    os.makedirs(root, exist_ok=True)
    paths = [os.path.join(root, f"photo-{i:05d}.jpg") for i in range(n)]

    def write(i: int) -> None:
        if os.path.exists(paths[i]):
            return
        exif = Image.Exif()
        if i % 4 == 3:
            exif[_EXIF_ORIENTATION] = 6
        tmp = paths[i] + ".part"
        phone_photo(i, size=size, seed=seed).save(tmp, "JPEG", quality=quality,
                                                  exif=exif.tobytes())
        os.replace(tmp, paths[i])

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(write, range(n)))
    return paths
