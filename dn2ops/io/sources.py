"""Listing stage: SRC (directory, glob or manifest) -> one row per image.

SRC is expanded on a worker, not at pipeline construction, so a source of
millions of paths is never materialised in the launcher; the rows are then
reshuffled so that reading and embedding spread over all workers.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dn2ops.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
MANIFEST_EXTENSIONS = (".csv", ".parquet")


class SourceError(UserError, ValueError):
    """SRC cannot be listed: it does not exist, is empty, or a manifest is malformed."""


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def is_manifest(src: str) -> bool:
    return src.lower().endswith(MANIFEST_EXTENSIONS) and not any(c in src for c in "*?[")


def read_manifest(src: str) -> Iterator[dict[str, Any]]:
    """Rows of a CSV or Parquet manifest with a ``uri`` column; other columns kept as str.

    Read as it is consumed (CSV line by line, Parquet a record batch at a time): a
    manifest of millions of rows is never held whole, as Python rows about 500 bytes
    each (issue 19).
    """
    # Relative uris are relative to the manifest; local ones become absolute so that the
    # outputs name the same file whatever directory dn2 was started from.
    base = posixpath.dirname(src) if "://" in src else os.path.dirname(os.path.abspath(src))
    for i, row in enumerate(_manifest_rows(src)):
        if i == 0 and "uri" not in row:
            raise SourceError(f"manifest {src} has no 'uri' column (columns: {list(row)})")
        uri = str(row["uri"])
        if "://" not in uri and not uri.startswith("/"):
            uri = posixpath.join(base, uri)  # relative to the manifest
        yield {**{k: "" if v is None else str(v) for k, v in row.items()}, "uri": uri}


def _manifest_rows(src: str) -> Iterator[dict[str, Any]]:
    try:
        with fsspec.open(src, "rb") as f:
            if src.lower().endswith(".parquet"):
                for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                    yield from batch.to_pylist()
            else:
                yield from csv.DictReader(io.TextIOWrapper(f, encoding="utf-8-sig",
                                                           newline=""))
    except (pa.ArrowInvalid, UnicodeDecodeError, csv.Error) as e:  # the file, not dn2
        raise SourceError(f"manifest {src} cannot be read: {e}") from None


def list_source(src: str) -> Iterator[dict[str, Any]]:
    """Expands SRC into rows ``{"uri": ..., **manifest columns}``.

    A directory yields every file under it with an image extension (hidden
    files skipped); a glob yields every match, image or not, so that a bad
    match is reported rather than dropped; a manifest yields its rows.
    """
    if is_manifest(src):
        yield from read_manifest(src)
        return
    fs, path = fsspec.core.url_to_fs(src)
    if any(c in path for c in "*?["):
        paths = sorted(fs.glob(path))
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path)
                       if p.lower().endswith(IMAGE_EXTENSIONS)
                       and not posixpath.basename(p).startswith("."))
    elif fs.exists(path):
        paths = [path]
    else:
        raise SourceError(f"input {src} does not exist")
    for p in paths:
        yield {"uri": _full_uri(fs, p)}


class ListImages(beam.PTransform):
    """PBegin -> PCollection of rows ``{"uri": str, **manifest columns}``, reshuffled."""

    def __init__(self, src: str):
        super().__init__()
        self.src = src

    def expand(self, pbegin):
        return (pbegin
                | "Source" >> beam.Create([self.src])
                | "Expand" >> beam.FlatMap(list_source)
                | "Spread" >> beam.Reshuffle())
