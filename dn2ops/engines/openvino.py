"""``--engine openvino``: dn2's backbone on OpenVINO's CPU runtime, as a Beam model handler.

``load_model()`` exports the backbone to ONNX (cached, and checked against its sha256, by
dn2ops.embed.export) and compiles it with OpenVINO. dn2 keeps no compiled blobs: OpenVINO's
own ``CACHE_DIR`` would import any blob under the expected name unchecked, and compiling
costs 0.16-0.28 s a process (Lite0 and the default backbone, 2 cores; a cached blob 0.03-
0.05 s). The model is read with the runtime's ``Core`` rather than
``openvino.convert_model``: the converter sends usage telemetry unless the
user opted out, and dn2 never reaches for the network.

Precision: OpenVINO runs in bfloat16 by default on CPUs that have it (this
project's AVX512-BF16 machine among them), which moves features by ~2% of their
scale; dn2 asks for float32 so that features equal torch's (max |difference|
~1e-5). Latency mode, one stream: a batch is one request using every thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import PredictionResult

from dn2ops.embed.export import exported_model
from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.base import Dn2ModelHandler, engine_batch, in_slices, thread_plan

LOG = logging.getLogger("dn2")


class CompiledBackbone:
    """A compiled model with one infer request per thread: Beam may run bundles on
    several threads of one process, and a request must not be shared between them."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.output = compiled.output(0)
        self._local = threading.local()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request.infer({0: batch})[self.output].copy()  # the request reuses its buffer


def compile_config(threads: int) -> dict[str, Any]:
    return {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads}


class OpenVinoModelHandler(Dn2ModelHandler[np.ndarray, PredictionResult, CompiledBackbone]):
    """uint8 batches (N, 3, crop, crop) -> pooled backbone features (dim,) float32, run
    in slices of dn2ops.engines.base.engine_batch images."""

    def __init__(self, plan: EmbedPlan):
        super().__init__(batch_size=plan.config.batch_size)
        self.plan = plan
        self.engine_batch = engine_batch(plan.config, gpu=False)

    def load_model(self) -> CompiledBackbone:
        import openvino as ov  # an optional package (pip install 'dn2[openvino]')

        threads, _ = thread_plan(self.plan)
        path = exported_model(self.plan)  # the torch backbone is loaded only to export it
        core = ov.Core()
        LOG.info("engine openvino %s: %s, %d threads", ov.get_version(), self.plan.backbone,
                 threads)
        return CompiledBackbone(core.compile_model(path, "CPU", compile_config(threads)))

    def run_inference(self, batch: Sequence[np.ndarray], model: CompiledBackbone,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[PredictionResult]:
        return [PredictionResult(None, f) for f in in_slices(model, batch, self.engine_batch)]
