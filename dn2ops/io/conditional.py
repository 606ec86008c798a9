"""Conditional writes on each store dn2 writes to: the compare-and-swap a lease needs.

One class a store, each with ``create`` (only if absent), ``read``, ``replace`` and
``delete`` (only if the object is still the version read). Each returns or takes a token
naming a version: the GCS generation, the S3 ETag, the sha256 of a local file. ``replace``
and ``delete`` raise Conflict when the object is no longer that version (or is gone);
``create`` when it exists.

* GCS: uploads with ``ifGenerationMatch`` (``0``: only if absent), deletes likewise,
  through the session gcsfs holds (``fs.call``). Multipart uploads, as gcsfs makes them:
  fake-gcs-server 1.54 applies preconditions to those (not to media uploads, nor to
  deletes).
* S3: PutObject with ``If-None-Match: *`` / ``If-Match: ETAG``, DeleteObject with
  ``If-Match``, through the boto client s3fs holds (``fs.call_s3``). A server may ignore
  the headers: ``S3Store.honours_if_none_match`` probes for the 412.
* Local disk: a file written with ``O_EXCL``, published by ``link(2)``, which fails on an
  existing name (an exclusive create whose content appears whole); replace and delete
  under ``flock`` of the current file, a replace by rename.
* memory:// lives in this process: a lock makes it exact.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import fsspec
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

# The name of S3Store's probe objects (beside the lease, which names them after itself).
PROBE = "_LEASE.probe"


class Conflict(Exception):
    """A conditional write or delete failed: the object is not the version expected."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalStore:
    """Local disk: an exclusive create, then compare-and-swap under ``flock``."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def create(self, path: str, data: bytes) -> str:
        folder = posixpath.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}")
        self._write_new(tmp, data)
        try:
            os.link(tmp, path)  # fails on an existing name, like O_CREAT|O_EXCL
        except FileExistsError:
            raise Conflict from None
        finally:
            os.unlink(tmp)
        return _digest(data)

    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            with open(path, "rb") as f:  # replaced whole by rename: never half-written
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def replace(self, path: str, data: bytes, token: str) -> str:
        with self._locked(path, token):
            tmp = f"{path}.{uuid.uuid4().hex}"
            self._write_new(tmp, data)
            os.replace(tmp, path)
        return _digest(data)

    def delete(self, path: str, token: str) -> None:
        with self._locked(path, token):
            os.unlink(path)

    @staticmethod
    def _write_new(path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    @contextlib.contextmanager
    def _locked(path: str, token: str) -> Iterator[None]:
        """Holds ``flock`` on the file at ``path`` while it is the version ``token``.

        Writers replace the file by rename while holding the lock on the old one: a
        process that waited for that lock finds its file no longer at ``path``."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise Conflict from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            with os.fdopen(os.dup(fd), "rb") as f:
                if not same or _digest(f.read()) != token:
                    raise Conflict
            yield
        finally:
            os.close(fd)  # releases the lock


class MemoryStore:
    """fsspec's memory:// filesystem lives in this process: a lock makes it exact."""

    _lock = threading.Lock()

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def create(self, path: str, data: bytes) -> str:
        with self._lock:
            if self.fs.exists(path):
                raise Conflict
            self.fs.pipe_file(path, data)
        return _digest(data)

    def read(self, path: str) -> tuple[bytes, str] | None:
        with self._lock:
            if not self.fs.exists(path):
                return None
            data = self.fs.cat_file(path)
        return data, _digest(data)

    def replace(self, path: str, data: bytes, token: str) -> str:
        with self._lock:
            if not self.fs.exists(path) or _digest(self.fs.cat_file(path)) != token:
                raise Conflict
            self.fs.pipe_file(path, data)
        return _digest(data)

    def delete(self, path: str, token: str) -> None:
        with self._lock:
            if not self.fs.exists(path) or _digest(self.fs.cat_file(path)) != token:
                raise Conflict
            self.fs.rm_file(path)


def _precondition_failed(e: BaseException) -> bool:
    """s3fs's error for a failed If-None-Match (FileExistsError) or If-Match (an OSError
    caused by botocore's 412 PreconditionFailed, or 409 ConditionalRequestConflict)."""
    if isinstance(e, FileExistsError):
        return True
    response = getattr(e.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class S3Store:
    """S3: PutObject with If-None-Match / If-Match, DeleteObject with If-Match, through
    the boto client s3fs holds."""

    probed: dict[tuple[str, str], bool] = {}  # (endpoint, bucket) -> honours If-None-Match

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def _put(self, path: str, data: bytes, **condition: str) -> str:
        bucket, key, _ = self.fs.split_path(path)
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data,
                                  **condition)
        except (FileNotFoundError, OSError) as e:
            if _precondition_failed(e) or ("IfMatch" in condition
                                           and isinstance(e, FileNotFoundError)):
                raise Conflict from None
            raise
        finally:
            self.fs.invalidate_cache(path)
        return out["ETag"]

    def create(self, path: str, data: bytes) -> str:
        return self._put(path, data, IfNoneMatch="*")

    def replace(self, path: str, data: bytes, token: str) -> str:
        return self._put(path, data, IfMatch=token)

    def read(self, path: str) -> tuple[bytes, str] | None:
        bucket, key, _ = self.fs.split_path(path)

        async def get() -> tuple[bytes, str]:
            out = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with out["Body"] as body:
                return await body.read(), out["ETag"]

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def delete(self, path: str, token: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=token)
        except (FileNotFoundError, OSError) as e:
            if _precondition_failed(e) or isinstance(e, FileNotFoundError):
                raise Conflict from None
            raise
        finally:
            self.fs.invalidate_cache(path)

    def honours_if_none_match(self, directory: str) -> bool:
        """Whether the server refuses a second If-None-Match create of one object (a
        probe object under ``directory``, deleted after); asked once a server and bucket."""
        bucket = self.fs.split_path(directory)[0]
        server = (self.fs.s3.meta.endpoint_url, bucket)  # the client s3fs made, connected
        if server not in self.probed:
            path = posixpath.join(directory, f"{PROBE}-{uuid.uuid4().hex[:12]}")
            self.create(path, b"probe")
            try:
                self.create(path, b"probe")
                self.probed[server] = False
            except Conflict:
                self.probed[server] = True
            finally:
                self.fs.rm_file(path)  # plain: the second create may have changed it
        return self.probed[server]


class GcsStore:
    """GCS: uploads with ``ifGenerationMatch`` (0: only if absent), deletes likewise,
    through gcsfs's own session. Multipart uploads, the kind gcsfs makes: fake-gcs-server
    applies preconditions to those (not to media uploads)."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def _upload(self, path: str, data: bytes, generation: str) -> str:
        bucket, key, _ = self.fs.split_path(path)
        body = (b'--==0==\nContent-Type: application/json; charset=UTF-8\n\n'
                + json.dumps({"name": key}).encode()
                + b"\n--==0==\nContent-Type: application/json\n\n" + data + b"\n--==0==--")
        try:
            out = self.fs.call(
                "POST", f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                uploadType="multipart", ifGenerationMatch=generation, data=body,
                headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                json_out=True)
        except FileExistsError:  # gcsfs's name for 412 Precondition Failed
            raise Conflict from None
        finally:
            self.fs.invalidate_cache(path)
        return str(out["generation"])

    def create(self, path: str, data: bytes) -> str:
        return self._upload(path, data, "0")

    def replace(self, path: str, data: bytes, token: str) -> str:
        return self._upload(path, data, token)

    def read(self, path: str) -> tuple[bytes, str] | None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            headers, data = self.fs.call("GET", "b/{}/o/{}", bucket, key, alt="media")
        except FileNotFoundError:
            return None
        return data, str(headers["X-Goog-Generation"])

    def delete(self, path: str, token: str) -> None:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=token)
        except (FileExistsError, FileNotFoundError):
            raise Conflict from None
        finally:
            self.fs.invalidate_cache(path)


def store_for(fs: fsspec.AbstractFileSystem):
    """The store class for ``fs``, or None where dn2 cannot take a lease."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if isinstance(fs, LocalFileSystem):
        return LocalStore(fs)
    if protocols & {"s3", "s3a"}:
        return S3Store(fs)
    if protocols & {"gs", "gcs"}:
        return GcsStore(fs)
    if "memory" in protocols:
        return MemoryStore(fs)
    return None


