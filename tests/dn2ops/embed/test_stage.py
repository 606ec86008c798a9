"""PrepareImages: concurrent reads, every row accounted for, errors kept, bounded in flight."""

from __future__ import annotations

import hashlib
import threading
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

import dn2ops.embed.stage
import dn2ops.engines.base
import dn2ops.rows
from benchmarks.datasets import write_png_store
from dn2ops.config import DEFAULT_MAX_PIXELS, EmbedConfig
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.plan import EmbedPlan
from dn2ops.embed.stage import ERRORS, EmbedImages, PrepareImages, prepare
from pipelines.options import LOCAL_RUNNER
from tests.conftest import digit_images

PREP = get_spec("efficientnet_lite0").preprocessing


def _digest(key_and_tensor) -> tuple[str, str, str]:
    """(uri, sha256 of the bytes, sha1 of the uint8 crop): comparable across processes."""
    key, pixels = key_and_tensor
    return key.uri, key.sha256, hashlib.sha1(pixels.tobytes()).hexdigest()


def _prepared(rows: list[dict], max_in_flight: int, reads: int | None = None):
    """Runs PrepareImages over rows; returns (pipeline, images PCollection, errors)."""
    p = BeamTestPipeline(runner=LOCAL_RUNNER)
    out = (p | beam.Create(rows)
           | beam.ParDo(PrepareImages(PREP, DEFAULT_MAX_PIXELS, max_in_flight=max_in_flight,
                                      reads=reads))
           .with_outputs(ERRORS, main="images"))
    return p, out.images, out[ERRORS]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """14 digit PNGs, a missing file, a text file and a directory named like an image."""
    root = tmp_path_factory.mktemp("prepare")
    _, images, _ = digit_images(n_incoming=14)
    write_png_store(images, [f"d{i:02d}" for i in range(len(images))], str(root))
    (root / "notes.png").write_text("not an image")
    (root / "folder.png").mkdir()
    uris = sorted(str(p) for p in root.glob("d*.png"))
    bad = [str(root / "missing.png"), str(root / "notes.png"), str(root / "folder.png")]
    return [{"uri": u, "label": str(i % 2)} for i, u in enumerate(uris + bad)]


@pytest.mark.parametrize("max_in_flight", [1, 3, 16])
def test_every_row_is_prepared_or_an_error(rows, max_in_flight):
    expected, expected_errors = [], []
    for row in rows:  # the reference: prepare() called on each row in turn
        try:
            expected.append(_digest(prepare(row, PREP)))
        except Exception as e:
            expected_errors.append((row["uri"], e.stage))
    assert len(expected) == 14 and [s for _, s in expected_errors] == ["read", "decode", "read"]
    p, images, errors = _prepared(rows, max_in_flight)
    assert_that(images | beam.Map(_digest), equal_to(expected), label="images")
    assert_that(errors | beam.Map(lambda e: (e["uri"], e["stage"])), equal_to(expected_errors),
                label="errors")
    p.run().wait_until_finish()


def test_manifest_columns_travel_with_the_key(rows):
    p, images, _ = _prepared(rows, 4)
    assert_that(images | beam.Map(lambda kt: (kt[0].uri, kt[0].extras)),
                equal_to([(r["uri"], (("label", r["label"]),)) for r in rows[:14]]))
    p.run().wait_until_finish()


class _SlowReads:
    """read_bytes with a fixed delay that records how many reads were in flight at most."""

    def __init__(self, delay_s: float, fail: str | None = None):
        self.delay_s, self.fail = delay_s, fail
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.real = dn2ops.embed.stage.read_bytes

    def __call__(self, uri: str) -> bytes:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.delay_s)
            if uri == self.fail:
                raise ConnectionError("simulated: the store reset the connection")
            return self.real(uri)
        finally:
            with self.lock:
                self.now -= 1


@pytest.mark.parametrize(("max_in_flight", "reads", "peak"), [(1, None, 1), (4, None, 4),
                                                              (8, 2, 2)])
def test_reads_run_concurrently_up_to_the_bound(rows, monkeypatch, max_in_flight, reads,
                                                peak):
    """At most ``reads`` images are read (and held encoded) at once, of the rows pending."""
    good = rows[:14]
    slow = _SlowReads(0.05, fail=good[3]["uri"])
    monkeypatch.setattr(dn2ops.embed.stage, "read_bytes", slow)  # the in-process runner sees it
    p, images, errors = _prepared(good, max_in_flight, reads)
    assert_that(images | beam.Map(lambda kt: kt[0].uri),
                equal_to([r["uri"] for r in good if r is not good[3]]), label="images")
    assert_that(errors | beam.Map(lambda e: (e["uri"], e["stage"], e["error"])),
                equal_to([(good[3]["uri"], "read",
                           "ConnectionError: simulated: the store reset the connection")]),
                label="errors")
    p.run().wait_until_finish()
    assert slow.peak == peak


def test_max_in_flight_must_be_positive():
    with pytest.raises(ValueError, match="max_in_flight and reads must be at least 1"):
        PrepareImages(PREP, DEFAULT_MAX_PIXELS, max_in_flight=0)
    with pytest.raises(ValueError, match="max_in_flight and reads must be at least 1"):
        PrepareImages(PREP, DEFAULT_MAX_PIXELS, max_in_flight=4, reads=0)


class _CountedDecodes:
    """dn2ops.embed.stage._decode_and_crop, slowed down, counting the decodes running at once."""

    def __init__(self, delay_s: float):
        self.real = dn2ops.embed.stage._decode_and_crop
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.now = self.peak = 0

    def __call__(self, *args):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.delay_s)
            return self.real(*args)
        finally:
            with self.lock:
                self.now -= 1


@pytest.mark.parametrize(("cores", "workers", "decodes"), [(2, 1, 2), (4, 1, 4), (4, 2, 2),
                                                          (4, None, 1)])
def test_decodes_at_once_follow_the_cores_of_the_thread_plan(rows, monkeypatch, cores,
                                                              workers, decodes):
    """With 16 reads in flight, PrepareImages decodes as many images at once as the plan's
    share of the cores (cores // workers; 1 per SDK process on Dataflow), never more."""
    monkeypatch.setattr(dn2ops.engines.base, "usable_cores", lambda: cores)
    counted = _CountedDecodes(0.05)
    monkeypatch.setattr(dn2ops.embed.stage, "_decode_and_crop", counted)
    plan = EmbedPlan(EmbedConfig(backbone="efficientnet_lite0", engine="onnxruntime",
                                 device="cpu"), get_spec("efficientnet_lite0"),
                     weights_sha256="", workers=workers)
    fn = PrepareImages(PREP, DEFAULT_MAX_PIXELS, max_in_flight=16, plan=plan)
    fn.setup()
    fn.start_bundle()
    good = rows[:14]
    out = [v for row in good for v in fn.process(row, 0, None)] + list(fn.finish_bundle())
    fn.teardown()
    assert sorted(v.value[0].uri for v in out) == sorted(r["uri"] for r in good)
    assert counted.peak == decodes


def test_embed_images_embeds_as_its_plan_says(rows):
    """Feature rows of the plan's backbone and dim for every readable image, an error row
    for each of the others, nothing reused without --reuse."""
    plan = EmbedPlan.resolve(EmbedConfig(backbone="efficientnet_lite0", engine="torch",
                                         device="cpu", batch_size=4))
    good, bad = rows[:5], rows[-3:]
    p = BeamTestPipeline(runner=LOCAL_RUNNER)
    feats, errors, reused, copied = p | beam.Create(good + bad) | EmbedImages(plan)
    assert copied is None  # nothing to copy from: no reuse, no adopted pieces
    assert_that(feats | beam.Map(lambda r: (r["uri"], r["backbone"], r["dim"], r["label"],
                                            r["embedding"].shape)),
                equal_to([(r["uri"], "efficientnet_lite0", 1280, r["label"], (1280,))
                          for r in good]), label="features")
    assert_that(errors | beam.Map(lambda e: e["stage"]), equal_to(["read", "decode", "read"]),
                label="errors")
    assert_that(reused, equal_to([]), label="reused")
    p.run().wait_until_finish()


def test_embed_images_refuses_an_unknown_decode():
    plan = EmbedPlan(EmbedConfig(backbone="efficientnet_lite0", decode="fast"),
                     get_spec("efficientnet_lite0"), weights_sha256="")
    with pytest.raises(ValueError, match="decode must be one of"):
        EmbedImages(plan)


def test_feature_row_carries_a_float32_array_of_its_own():
    """Rows travel with float32 arrays, never Python float lists (issue 19), each its own
    copy: a row held downstream must not pin its whole batch's array."""
    import numpy as np

    batch = np.arange(12, dtype=np.float32).reshape(3, 4) / 3
    key = dn2ops.rows.ImageKey("mem://a.png", "ab" * 32, (("lot", "7"),))
    row = dn2ops.rows.feature_row(key, batch[1], "toy")
    assert row == {**row, "uri": "mem://a.png", "sha256": "ab" * 32, "backbone": "toy",
                   "dim": 4, "lot": "7"}
    assert isinstance(row["embedding"], np.ndarray) and row["embedding"].dtype == np.float32
    np.testing.assert_array_equal(row["embedding"], batch[1])
    assert not np.shares_memory(row["embedding"], batch)
