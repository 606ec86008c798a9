"""dn2ops.embed.resume: images are resumed by (uri, sha256) from adopted pieces; the key
of a run's staging changes with whatever changes its features."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from dn2ops.config import EmbedConfig
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.plan import EmbedPlan
from dn2ops.embed.resume import PieceLocation, find, load_resumed, resume_key
from dn2ops.embed.reuse import Location
from dn2ops.io import pieces


def _rows(uris: list[str], shas: list[str]) -> list[dict]:
    return [{"uri": u, "sha256": s, "backbone": "b", "dim": 2,
             "embedding": np.ones(2, np.float32)} for u, s in zip(uris, shas, strict=True)]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_images_are_resumed_by_uri_and_bytes(tmp_path):
    staging = str(tmp_path / "_staging-k-r")
    a = pieces.seal(staging, _rows(["/x/a.png", "/x/b.png"], [_sha(b"a"), _sha(b"b")]),
                    bytes(32))
    b = pieces.seal(staging, _rows(["/x/c.png"], [_sha(b"c")]), bytes(32))
    resumed = load_resumed((a, b))
    assert find(resumed, "/x/b.png", _sha(b"b")) == PieceLocation(0, 1)
    assert find(resumed, "/x/c.png", _sha(b"c")) == PieceLocation(1, 0)
    assert isinstance(find(resumed, "/x/c.png", _sha(b"c")), Location)
    assert find(resumed, "/x/b.png", _sha(b"changed")) is None  # changed since: embed again
    assert find(resumed, "/y/b.png", _sha(b"b")) is None  # same bytes, another uri
    assert find(None, "/x/a.png", _sha(b"a")) is None
    assert len(load_resumed(())) == 0
    assert Path(a).exists()


def test_the_key_changes_with_what_changes_features():
    spec = get_spec("efficientnet_lite0")
    plan = EmbedPlan(EmbedConfig(backbone="efficientnet_lite0"), spec, "ab" * 32)
    key = resume_key(plan, input="/in", engine="onnxruntime", device="cpu")
    assert len(key) == 16 and key == resume_key(plan, input="/in", engine="onnxruntime",
                                                device="cpu")
    others = [
        resume_key(plan, input="/other", engine="onnxruntime", device="cpu"),
        resume_key(plan, input="/in", engine="torch", device="cpu"),
        resume_key(plan, input="/in", engine="torch", device="cuda"),
        resume_key(dataclasses.replace(plan, weights_sha256="cd" * 32), input="/in",
                   engine="onnxruntime", device="cpu"),
        resume_key(dataclasses.replace(plan, config=EmbedConfig(
            backbone="efficientnet_lite0", decode="full")), input="/in",
            engine="onnxruntime", device="cpu"),
        resume_key(EmbedPlan(EmbedConfig(backbone="efficientnet_lite1"),
                             get_spec("efficientnet_lite1"), "ab" * 32),
                   input="/in", engine="onnxruntime", device="cpu"),
    ]
    assert len({key, *others}) == len(others) + 1
    # what does not change features does not change the key
    assert key == resume_key(dataclasses.replace(plan, config=EmbedConfig(
        backbone="efficientnet_lite0", batch_size=8, threads=1)), input="/in",
        engine="onnxruntime", device="cpu")
