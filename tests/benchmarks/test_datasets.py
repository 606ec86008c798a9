"""Tests for benchmarks.datasets (IDX reading, Fashion-MNIST, PNG store, manifest)."""

from __future__ import annotations

import csv
import gzip
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from benchmarks.datasets import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    read_idx,
    write_manifest,
    write_png_store,
)

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"

# Hand-written IDX: magic 00 00 08 (uint8) 02 (ndim), dims 2 and 3, data 1..6.
IDX_U8_2X3 = bytes([0, 0, 0x08, 2] + [0, 0, 0, 2] + [0, 0, 0, 3] + [1, 2, 3, 4, 5, 6])
# magic 00 00 0B (big-endian int16) 01, dim 2, data 0xFFFE (-2), 0x0100 (256).
IDX_I16 = bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0xFF, 0xFE, 0x01, 0x00])


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh memory:// root, removed afterwards (the store is process-wide)."""
    root = f"memory://dn2-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_idx_uint8(tmp_path: Path, compress: bool) -> None:
    data = gzip.compress(IDX_U8_2X3) if compress else IDX_U8_2X3
    # The name deliberately lacks ".gz": compression is sniffed from content.
    arr = read_idx(_write(tmp_path / "x-idx2-ubyte", data))

    assert arr.dtype == np.uint8
    assert arr.shape == (2, 3)
    assert arr.tolist() == [[1, 2, 3], [4, 5, 6]]
    arr[0, 0] = 9  # writable, not a view of the file bytes


def test_read_idx_big_endian_int16(tmp_path: Path) -> None:
    arr = read_idx(_write(tmp_path / "x.idx", IDX_I16))

    assert arr.dtype == np.dtype("int16")
    assert arr.dtype.isnative
    assert arr.tolist() == [-2, 256]


def test_read_idx_fsspec_url(memory_root: str) -> None:
    url = f"{memory_root}/x.idx.gz"
    with fsspec.open(url, "wb") as f:
        f.write(gzip.compress(IDX_U8_2X3))

    assert read_idx(url).tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(
            b"\x00\x00", r"too short for an IDX header \(2 bytes\)", id="short"
        ),
        pytest.param(
            b"\x01\x00" + IDX_U8_2X3[2:],
            r"not an IDX file: magic number 01000802",
            id="magic",
        ),
        pytest.param(
            b"\x50\x4b\x03\x04" + IDX_U8_2X3[4:],
            r"must start with two zero bytes",
            id="zip",
        ),
        pytest.param(
            b"\x00\x00\x0a\x02" + IDX_U8_2X3[4:],
            r"unknown IDX dtype code 0x0a",
            id="dtype",
        ),
        pytest.param(b"\x00\x00\x08\x00", r"declares 0 dimensions", id="ndim0"),
        pytest.param(IDX_U8_2X3[:10], r"truncated IDX header", id="header"),
        pytest.param(IDX_U8_2X3[:-1], r"need 6 bytes, found 5", id="data-short"),
        pytest.param(IDX_U8_2X3 + b"\x00", r"need 6 bytes, found 7", id="data-long"),
        pytest.param(
            gzip.compress(IDX_U8_2X3)[:-6], r"corrupt gzip stream", id="bad-gzip"
        ),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        read_idx(_write(tmp_path / "bad.idx", data))


@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_load_fashion_mnist(split: str, n: int) -> None:
    if not os.path.isdir(FASHION_ROOT):
        pytest.skip(f"{FASHION_ROOT} missing (apt-get install dataset-fashion-mnist)")

    images, labels = load_fashion_mnist(FASHION_ROOT, split)

    assert images.shape == (n, 28, 28)
    assert labels.shape == (n,)
    assert images.dtype == np.uint8
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == set(range(len(FASHION_MNIST_CLASSES)))


def test_load_fashion_mnist_missing_dir_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"
    ):
        load_fashion_mnist(str(tmp_path), "train")


def test_load_fashion_mnist_from_hand_made_files(tmp_path: Path) -> None:
    n = 3
    header = bytes([0, 0, 8, 3, 0, 0, 0, n, 0, 0, 0, 28, 0, 0, 0, 28])
    pixels = np.arange(n * 28 * 28, dtype=np.uint64).astype(np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(header + pixels.tobytes())
    )
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, n, 7, 0, 9]))
    )

    images, labels = load_fashion_mnist(str(tmp_path), "test")

    assert np.array_equal(images, pixels.reshape(n, 28, 28))
    assert labels.tolist() == [7, 0, 9]


def test_load_fashion_mnist_bad_split() -> None:
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\]"):
        load_fashion_mnist(FASHION_ROOT, "validation")


def test_fashion_mnist_classes() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top"
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot"


def _random_images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _read_png(uri: str) -> np.ndarray:
    with fsspec.open(uri, "rb") as f:
        return np.asarray(Image.open(io.BytesIO(f.read())))


@pytest.mark.parametrize("shape", [(3, 6, 5), (2, 6, 5, 3)], ids=["gray", "rgb"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_write_png_store_roundtrip(
    tmp_path: Path, memory_root: str, shape: tuple[int, ...], where: str
) -> None:
    root = str(tmp_path / "store") if where == "local" else memory_root
    images = _random_images(shape)
    names = [
        f"split/{i % 2}/img{i:03d}" + (".png" if i else "") for i in range(len(images))
    ]

    uris = write_png_store(images, names, root)

    assert uris == [
        f"{root}/{name}" if name.endswith(".png") else f"{root}/{name}.png"
        for name in names
    ]
    for uri, image in zip(uris, images, strict=True):
        assert np.array_equal(_read_png(uri), image)


def test_write_png_store_explicit_fs(memory_root: str) -> None:
    fs = fsspec.filesystem("memory")
    bare_root = memory_root.removeprefix("memory://")
    images = _random_images((2, 4, 4))

    uris = write_png_store(images, ["a.png", "b.png"], bare_root, fs=fs)

    assert all(uri.startswith("memory://") for uri in uris)
    assert np.array_equal(_read_png(uris[1]), images[1])


def test_write_png_store_is_idempotent(tmp_path: Path) -> None:
    images = _random_images((3, 8, 8))
    names = ["a.png", "b.png", "sub/c.png"]
    uris = write_png_store(images, names, str(tmp_path))
    for uri in uris:
        os.utime(uri, ns=(0, 0))  # mark: a rewrite would bump mtime

    assert write_png_store(images, names, str(tmp_path)) == uris
    assert [os.stat(uri).st_mtime_ns for uri in uris] == [0, 0, 0]

    Path(uris[2]).write_bytes(b"partial")  # e.g. a crash mid-write
    write_png_store(images, names, str(tmp_path))
    assert np.array_equal(_read_png(uris[2]), images[2])
    assert [os.stat(uri).st_mtime_ns for uri in uris[:2]] == [0, 0]


@pytest.mark.parametrize(
    ("images", "names", "reason"),
    [
        (
            np.zeros((2, 4, 4), np.float32),
            ["a", "b"],
            r"images must be uint8, got float32",
        ),
        (
            np.zeros((2, 4, 4, 4), np.uint8),
            ["a", "b"],
            r"shape \(N, H, W\) or \(N, H, W, 3\)",
        ),
        (np.zeros((2, 4, 4), np.uint8), ["a"], r"got 2 images but 1 names"),
        (np.zeros((1, 4, 4), np.uint8), ["../escape.png"], r"stay under root"),
        (np.zeros((1, 4, 4), np.uint8), ["/abs.png"], r"relative path"),
        (np.zeros((1, 4, 4), np.uint8), [""], r"relative path"),
        (np.zeros((2, 4, 4), np.uint8), ["a", "a.png"], r"names must be unique"),
    ],
)
def test_write_png_store_rejects(
    tmp_path: Path, images: np.ndarray, names: list[str], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        write_png_store(images, names, str(tmp_path))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_write_manifest(tmp_path: Path, memory_root: str, where: str) -> None:
    path = (
        str(tmp_path / "out" / "manifest.csv")
        if where == "local"
        else (f"{memory_root}/manifest.csv")
    )
    rows = [
        {"label": 3, "uri": "memory://x/a.png", "split": "train"},
        {"uri": "memory://x/b, c.png", "label": 9},
        {"uri": "memory://x/d.png", "split": "test", "note": "new column"},
    ]

    write_manifest(rows, path)

    with fsspec.open(path, "rt", newline="") as f:
        text = f.read()
    assert text.splitlines()[0] == "uri,label,split,note"
    read = list(csv.DictReader(io.StringIO(text)))
    assert read == [
        {"uri": "memory://x/a.png", "label": "3", "split": "train", "note": ""},
        {"uri": "memory://x/b, c.png", "label": "9", "split": "", "note": ""},
        {"uri": "memory://x/d.png", "label": "", "split": "test", "note": "new column"},
    ]


def test_write_manifest_requires_uri(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"manifest row 1 has no 'uri'"):
        write_manifest([{"uri": "a"}, {"label": 1}], str(tmp_path / "m.csv"))
