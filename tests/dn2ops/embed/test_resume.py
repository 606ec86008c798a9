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


def test_a_piece_is_copied_only_while_it_is_the_piece_its_seal_signed(tmp_path):
    """CopyFeatures with the pieces' checksums (as pieces.find checked them): the rows
    of a piece that still has its sealed bytes are copied; a piece rewritten since the
    check (same uris and sha256 values, other embeddings: planted features) is refused,
    whatever its rows say."""
    import apache_beam as beam
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import BeamAssertException, assert_that

    from dn2ops.embed.reuse import CopyFeatures
    from dn2ops.io.features import embeddings
    from dn2ops.rows import ImageKey

    staging = str(tmp_path / "_staging-k-r")
    uris, shas = ["/x/a.png", "/x/b.png"], [_sha(b"a"), _sha(b"b")]
    piece = pieces.seal(staging, _rows(uris, shas), bytes(32))
    checksum = _sha(Path(piece).read_bytes())
    keys = [(ImageKey(u, s, ()), PieceLocation(0, i))
            for i, (u, s) in enumerate(zip(uris, shas, strict=True))]

    def copy(p):
        return (p | beam.Create(keys, reshuffle=False)
                | CopyFeatures(None, "b", paths=[piece], checksums=[checksum]))

    def ones(batches):
        table = pa.Table.from_batches(batches)
        if sorted(table.column("uri").to_pylist()) != uris or not np.array_equal(
                embeddings(table), np.ones((2, 2), np.float32)):
            raise BeamAssertException(f"copied {table.to_pylist()}")

    with TestPipeline(runner="FnApiRunner") as p:
        assert_that(copy(p), ones)

    planted = pq.read_table(piece)
    planted = planted.set_column(planted.schema.get_field_index("embedding"), "embedding",
                                 pa.array([[9.0, 9.0]] * 2, pa.list_(pa.float32())))
    pq.write_table(planted, piece)
    with pytest.raises(Exception, match="changed after this run checked it"):
        with TestPipeline(runner="FnApiRunner") as p:
            copy(p)
