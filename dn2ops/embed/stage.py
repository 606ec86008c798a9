"""Embedding stage: image rows -> feature rows, through Beam's RunInference.

Per element (plain functions, testable without Beam): read the bytes, hash
them, decode to RGB (only the pixels needed, see dn2ops.embed.images), resize and
crop to a uint8 array (3, crop, crop), on a small thread pool so that several
images are read at once and decoding overlaps inference (PrepareImages).
Batched: the model handler of the chosen engine (dn2ops.engines) normalises and
runs the backbone (one model per worker process, loaded in ``load_model``). The stage
takes its dn2ops.embed.plan.EmbedPlan whole: the flags, the backbone's spec, the workers.
Anything that fails for one image becomes an error row with its stage and
reason; it never fails the run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from typing import Any

import apache_beam as beam
import fsspec
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.utils.shared import Shared
from apache_beam.utils.windowed_value import WindowedValue

from dn2ops.config import DEFAULT_MAX_PIXELS
from dn2ops.embed import resume as resuming
from dn2ops.embed.images import ImageDecodeError, load_image, sha256_hex
from dn2ops.embed.plan import EmbedPlan
from dn2ops.embed.preprocess import Preprocessing
from dn2ops.embed.resume import PieceLocation, Resume
from dn2ops.embed.reuse import CopyFeatures, Known, Location
from dn2ops.engines.auto import make_handler
from dn2ops.engines.base import thread_plan
from dn2ops.io.pieces import SealPieces
from dn2ops.rows import ImageKey, error_row, feature_row

ERRORS = "errors"
REUSED = "reused"  # images whose features --reuse copies (PrepareImages' third output)
RESUMED = "resumed"  # images whose features an adopted sealed piece holds (dn2ops.embed.resume)
# draft: decode only the pixels the resize needs (JPEG DCT scaling, integer reduction);
# full: every pixel, then resize (dn2's path before draft decoding; for comparisons).
DECODES = ("draft", "full")


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def prepare(row: dict[str, Any], preprocessing: Preprocessing,
            max_pixels: int = DEFAULT_MAX_PIXELS, decode: str = "draft",
            cpu: threading.Semaphore | None = None, known: Known | None = None,
            reads: threading.Semaphore | None = None, resumed: Known | None = None
            ) -> tuple[ImageKey, np.ndarray | Location]:
    """Row -> (key, uint8 array (3, crop, crop)). Raises _StageError naming the stage.

    ``reads``: held from the read until the image is decoded, so that it bounds the
    encoded images held at once (a 12 MP JPEG is 2-4 MB), whatever the rows pending.
    ``cpu``: held while hashing, decoding and cropping (not while reading), so that
    threads waiting on storage do not count against the cores set aside for decoding.
    ``known`` (``--reuse``): an image whose sha256 it holds is not decoded; its key
    comes with the Location of its earlier features instead of pixels.
    ``resumed`` (a rerun after a crash): an image whose (uri, sha256) an adopted sealed
    piece holds comes with its PieceLocation (dn2ops.embed.resume), not decoded either.
    """
    uri = row["uri"]
    with reads or contextlib.nullcontext():
        try:
            data = read_bytes(uri)
        except Exception as e:  # every storage backend has its own errors
            raise _StageError("read", _read_reason(e)) from e
        extras = tuple((k, v) for k, v in row.items() if k != "uri")
        with cpu or contextlib.nullcontext():
            key = ImageKey(uri, sha256_hex(data), extras)
            found = resuming.find(resumed, uri, key.sha256)
            if found is None and known is not None:
                found = known.find(key.sha256)
            if found is not None:
                return key, found
            return key, _decode_and_crop(data, preprocessing, max_pixels, decode)


def _decode_and_crop(data: bytes, preprocessing: Preprocessing, max_pixels: int,
                     decode: str) -> np.ndarray:
    min_side = preprocessing.resize if decode == "draft" else None
    try:
        image = load_image(data, max_pixels=max_pixels, min_side=min_side)
    except ImageDecodeError as e:
        raise _StageError("decode", str(e)) from e
    try:
        return preprocessing.crop_image(image)
    except Exception as e:
        raise _StageError("preprocess", f"{type(e).__name__}: {e}") from e


def _read_reason(e: Exception) -> str:
    if isinstance(e, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(e, PermissionError):
        return "permission denied: the file is not readable by this worker"
    if isinstance(e, FileNotFoundError):
        return "file not found (deleted after listing, or a manifest points nowhere)"
    return f"{type(e).__name__}: {e}"


class _StageError(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage


# Reads (each with its decode and crop) in flight per PrepareImages instance. An object
# store answers a small read in 20-100 ms: 16 at once keep 160-800 images/s coming, more
# than a worker embeds; each holds one encoded image until it is decoded (a 12 MP JPEG:
# 2-4 MB), and the image size limit (--max-pixels) bounds those.
DEFAULT_MAX_IN_FLIGHT = 16


def _prepared(row: dict[str, Any], preprocessing: Preprocessing, max_pixels: int,
              decode: str, cpu: threading.Semaphore | None, known: Known | None,
              reads: threading.Semaphore | None, resumed: Known | None = None
              ) -> tuple[str | None, Any]:
    """prepare() as an outcome that never raises: (None, (key, array)),
    (REUSED, (key, Location)), (RESUMED, (key, PieceLocation)) or (ERRORS, row)."""
    try:
        key, value = prepare(row, preprocessing, max_pixels, decode, cpu, known, reads,
                             resumed)
        tag = (RESUMED if isinstance(value, PieceLocation)
               else REUSED if isinstance(value, Location) else None)
        return tag, (key, value)
    except _StageError as e:
        return ERRORS, error_row(row["uri"], e.stage, str(e))
    except Exception as e:  # a bug or a surprise for one image: report it, go on
        return ERRORS, error_row(row["uri"], "prepare", e)


class PrepareImages(beam.DoFn):
    """Row -> (ImageKey, uint8 tensor); failures to the ``errors`` output; with
    ``reuse`` (an earlier features directory), images it holds to the ``reused`` output
    as (ImageKey, Location), not decoded.

    Each row's read, decode and crop (``prepare``) runs on a thread pool, at most
    ``max_in_flight`` rows at once: storage latency is hidden, and decoding overlaps the
    model's inference downstream in the same fused stage. ``process`` hands on whatever
    has finished and blocks only when ``max_in_flight`` rows are pending; ``finish_bundle``
    drains the rest. Outputs come in completion order, each in its own row's window.
    Of the rows pending, at most ``reads`` (None: ``max_in_flight``) are read and held
    encoded at once: the others wait holding only their row. ``max_in_flight=1`` reads
    one image at a time. Of the rows in flight, only the
    decode threads of ``plan``'s thread plan (dn2ops.engines.base.thread_plan) decode at
    once, so decoding and the model's threads together fit the cores (None: no limit
    beyond ``max_in_flight``). ``decode``: one of DECODES. ``resume``: the sealed
    pieces a rerun adopts; images they hold go to the ``resumed`` output as (ImageKey,
    PieceLocation), not decoded.
    """

    def __init__(self, preprocessing: Preprocessing, max_pixels: int, *,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, decode: str = "draft",
                 plan: EmbedPlan | None = None, reuse: str | None = None,
                 reads: int | None = None, resume: tuple[str, ...] = ()):
        if max_in_flight < 1 or (reads is not None and reads < 1):
            raise ValueError(f"max_in_flight and reads must be at least 1, got "
                             f"{max_in_flight}, {reads}")
        self.preprocessing = preprocessing
        self.max_pixels = max_pixels
        self.max_in_flight = max_in_flight
        self.reads = min(reads or max_in_flight, max_in_flight)
        self.decode = decode
        self.plan = plan
        self.reuse = reuse
        self.resume = tuple(resume)
        self._shared = Shared()  # one Known per worker process, whatever its threads
        self._shared_resumed = Shared()

    def setup(self):
        self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="dn2-prepare")
        self._pending: dict[Future, tuple[Any, Any]] = {}
        # Planned here, on the worker: its cores and its GPU, not the launcher's.
        self._cpu = (threading.BoundedSemaphore(thread_plan(self.plan)[1])
                     if self.plan is not None else None)
        self._reads = (threading.BoundedSemaphore(self.reads)
                       if self.reads < self.max_in_flight else None)
        self._known = (self._shared.acquire(lambda: Known.load(self.reuse), tag=self.reuse)
                       if self.reuse else None)
        self._resumed = (self._shared_resumed.acquire(
            lambda: resuming.load_resumed(self.resume), tag=self.resume)
            if self.resume else None)

    def start_bundle(self):
        self._pending = {}  # a failed bundle's leftovers are retried by the runner

    def process(self, row: dict[str, Any], timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam) -> Iterator[Any]:
        future = self._pool.submit(_prepared, row, self.preprocessing, self.max_pixels,
                                   self.decode, self._cpu, self._known, self._reads,
                                   self._resumed)
        self._pending[future] = (timestamp, window)
        done = [f for f in self._pending if f.done()]
        if not done and len(self._pending) >= self.max_in_flight:
            done = wait(self._pending, return_when=FIRST_COMPLETED).done
        yield from self._emit(done)

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._emit(as_completed(list(self._pending)))

    def _emit(self, futures: Iterable[Future]) -> Iterator[Any]:
        """Outcomes as WindowedValues in their rows' windows (finish_bundle has no element)."""
        for future in futures:
            timestamp, window = self._pending.pop(future)
            tag, value = future.result()
            out = WindowedValue(value, timestamp, (window,))
            yield out if tag is None else beam.pvalue.TaggedOutput(tag, out)

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _exception_reason(exc: Any) -> str:
    """``Type: message`` of an exception as Beam's exception handling hands it on.

    Beam passes ``(type, repr, formatted traceback lines)`` rather than the
    exception; the traceback's last line is the familiar ``Type: message``.
    """
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, tuple) and len(exc) == 3 and exc[2]:
        return "".join(exc[2]).rstrip().splitlines()[-1]
    if isinstance(exc, tuple) and len(exc) >= 2:
        return str(exc[1])
    return str(exc)


def _failed_batch_rows(failed: tuple[Sequence[tuple[ImageKey, Any]], Any]):
    """A batch the backbone failed on -> one error row per image of it (stage 'embed')."""
    batch, exc = failed
    reason = (f"the backbone failed on a batch of {len(batch)} images "
              f"(this image may be fine; rerun to retry it): {_exception_reason(exc)}")
    for key, _ in batch:
        yield error_row(key.uri, "embed", reason)


class EmbedImages(beam.PTransform):
    """Rows {"uri", ...} -> (feature rows, error rows, reused keys, copied feature
    batches), as ``plan`` says (dn2ops.embed.plan.EmbedPlan: the EmbedConfig whole, the
    backbone's spec, the model calls that share a machine's cores).

    ``reuse``: an earlier features directory (checked by reuse.check_reusable); images
    it holds are not decoded or embedded, their rows are copied (reuse.CopyFeatures) and
    their (ImageKey, Location) pairs are the third output (empty without ``reuse``).

    The feature rows are the images the model embedded (dicts); the rows copied from
    ``reuse`` or from adopted pieces come apart, as record batches of
    ``features.feature_schema(extra_columns)`` (None when nothing can be copied): joining
    them into one PCollection would end the embedding's fused stage there, so that every
    embedded row would be encoded, held and decoded again before it is written, where
    now it is written as it leaves the model (pipelines.graphs writes or scores both).

    From ``plan.config``: ``engine``, auto | torch | openvino | onnxruntime
    (dn2ops.engines.auto.make_handler); ``decode``, draft | full (DECODES); ``threads`` /
    ``decode_threads``, the engine's threads per model call and the images decoded at
    once beside it (None: dn2ops.engines.base.thread_plan splits the cores that
    ``plan.workers`` leave to each); ``max_in_flight`` (--reads-in-flight), images read
    and held encoded at once (PrepareImages' ``reads``; None: DEFAULT_MAX_IN_FLIGHT).
    PrepareImages takes a batch more rows than that (its ``max_in_flight``), so that
    reading and decoding go on through a whole model call, which blocks the thread that
    feeds PrepareImages; those rows wait holding nothing but the row.

    ``resume`` (dn2ops.embed.resume.Resume; the local runner's dn2 embed and dn2 score
    --input): every row the model makes is sealed in a piece of ``resume.staging``
    (dn2ops.io.pieces.SealPieces) before it is handed on, and the images that the
    adopted pieces ``resume.pieces`` hold are copied from them, not embedded (counted
    by the ``dn2`` counter ``resumed``).
    """

    def __init__(self, plan: EmbedPlan, *, reuse: str | None = None,
                 resume: Resume | None = None, extra_columns: Sequence[str] = ()):
        super().__init__()
        self.extra_columns = tuple(extra_columns)
        config = plan.config
        if config.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {config.decode!r}")
        self.plan = plan
        self.handler = make_handler(plan)
        self.reads = config.max_in_flight or DEFAULT_MAX_IN_FLIGHT
        self.max_in_flight = config.batch_size + self.reads
        self.reuse = reuse
        self.resume = resume

    def expand(self, rows):
        plan = self.plan
        prepared = rows | "Prepare" >> beam.ParDo(
            PrepareImages(plan.preprocessing, plan.config.max_pixels,
                          max_in_flight=self.max_in_flight, decode=plan.config.decode,
                          plan=plan, reuse=self.reuse, reads=self.reads,
                          resume=self.resume.pieces if self.resume else ())
        ).with_outputs(ERRORS, REUSED, RESUMED, main="images")
        inferred, failed = (prepared.images
                            | "Embed" >> RunInference(KeyedModelHandler(self.handler))
                            .with_exception_handling())
        features = inferred | "ToRow" >> beam.MapTuple(
            lambda key, result, name=plan.backbone: feature_row(key, result.inference, name))
        embed_errors = failed.failed_inferences | "FailedBatch" >> beam.FlatMap(
            _failed_batch_rows)
        errors = (prepared[ERRORS], embed_errors) | "AllErrors" >> beam.Flatten()
        if self.resume:
            features = features | "Seal" >> beam.ParDo(SealPieces(
                self.resume.staging, self.resume.piece_rows, self.resume.secret))
        copied = []
        if self.reuse:
            copied.append(prepared[REUSED] | "CopyReused" >> CopyFeatures(
                self.reuse, plan.backbone, extra_columns=self.extra_columns))
        if self.resume and self.resume.pieces:
            copied.append(prepared[RESUMED]
                          | "CountResumed" >> beam.Map(_counted(RESUMED))
                          | "CopyResumed" >> CopyFeatures(None, plan.backbone,
                                                          paths=self.resume.pieces,
                                                          checksums=self.resume.piece_sha256,
                                                          extra_columns=self.extra_columns))
        if len(copied) > 1:
            copied = [tuple(copied) | "AllCopied" >> beam.Flatten()]
        return features, errors, prepared[REUSED], (copied[0] if copied else None)


def _counted(name: str):
    """x -> x, counting each in the ``dn2`` counter ``name``."""
    counter = beam.metrics.Metrics.counter("dn2", name)

    def inc(x):
        counter.inc()
        return x

    return inc
