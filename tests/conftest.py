"""Shared fixtures: small real image stores (scikit-learn's 8x8 handwritten digits) and
real object-store servers (tests/objectstores.py)."""

from __future__ import annotations

import contextlib
import os
import uuid

import numpy as np
import pytest
from sklearn.datasets import load_digits

# gcsfs reads this when imported: its experimental zonal-bucket support probes GCS over
# gRPC, which an emulator lacks (60 s a call). Tests never reach the real GCS.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from dn2ops.datasets import write_manifest, write_png_store  # noqa: E402
from tests.objectstores import FakeGcs, MotoS3, fake_gcs_compatible  # noqa: E402


def digit_images(n_normal: int = 24, n_incoming: int = 30, normal_digit: int = 0):
    """(normal uint8 (n,32,32), incoming uint8 (m,32,32), incoming labels 1=anomalous)."""
    digits = load_digits()
    images = np.kron(digits.images, np.ones((4, 4)))  # 8x8 -> 32x32, values 0..16
    images = (images * (255 / 16)).round().astype(np.uint8)
    normal_idx = np.flatnonzero(digits.target == normal_digit)
    normal = images[normal_idx[:n_normal]]
    others = np.flatnonzero(digits.target != normal_digit)[: n_incoming * 2 // 3]
    rest = np.sort(np.concatenate([normal_idx[n_normal:][: n_incoming - len(others)], others]))
    return normal, images[rest], (digits.target[rest] != normal_digit).astype(int)


@pytest.fixture(scope="session")
def digit_store(tmp_path_factory):
    """A local image store: normal/ (digit 0), incoming/ and incoming.csv with labels."""
    root = tmp_path_factory.mktemp("store")
    normal, incoming, labels = digit_images()
    write_png_store(normal, [f"n{i:03d}" for i in range(len(normal))], str(root / "normal"))
    names = [f"i{i:03d}" for i in range(len(incoming))]
    write_png_store(incoming, names, str(root / "incoming"))
    write_manifest([{"uri": f"incoming/{n}.png", "label": int(y)}
                    for n, y in zip(names, labels, strict=True)], str(root / "incoming.csv"))
    return root


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_gcs_server(tmp_path_factory):
    server = FakeGcs(tmp_path_factory.mktemp("fake-gcs")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["s3", "gs"])
def bucket(request):
    """A new bucket on a real S3 (moto) or GCS (fake-gcs-server) server on 127.0.0.1, with
    the environment pointing every client at it for the module: its URL, s3://... or gs://..."""
    server = request.getfixturevalue("moto_server" if request.param == "s3"
                                     else "fake_gcs_server")
    with pytest.MonkeyPatch.context() as mp, (
            fake_gcs_compatible() if request.param == "gs" else contextlib.nullcontext()):
        for k, v in server.env.items():
            mp.setenv(k, v)
        yield server.new_bucket(f"dn2-{uuid.uuid4().hex[:10]}")

