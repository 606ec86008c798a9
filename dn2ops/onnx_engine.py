"""``--engine onnxruntime``: Beam's ONNX Runtime model handler on dn2's exported backbone.

Beam's ``OnnxModelHandlerNumpy`` loads an ONNX file from a URI into an
``InferenceSession`` and runs numpy batches through it. dn2 adds what its
backbone needs: the file is the backbone exported in ``load_model()`` (cached on
local disk by dn2ops.export), the session runs on the CPU with the threads of
dn2ops.engines.engine_threads, and results do not carry their input images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy

from dn2ops.engines import EngineConfig, thread_plan
from dn2ops.export import export_backbone

LOG = logging.getLogger("dn2")


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # a CNN is one chain of operators
    # Idle intra-op threads would spin for a while after each batch, taking the
    # cores from the threads that read and decode the next images.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxBackboneModelHandler(OnnxModelHandlerNumpy):
    """uint8 batches (N, 3, crop, crop) -> pooled backbone features (dim,) float32."""

    def __init__(self, config: EngineConfig):
        super().__init__(model_uri="", providers=["CPUExecutionProvider"],
                         min_batch_size=config.batch_size, max_batch_size=config.batch_size)
        self.config = config

    def load_model(self) -> ort.InferenceSession:
        threads, _ = thread_plan(self.config)
        self._model_uri = export_backbone(self.config.backbone, self.config.weights,
                                          self.config.cache_dir)
        self._session_options = session_options(threads)
        LOG.info("engine onnxruntime %s: %s, %d threads", ort.__version__,
                 self.config.backbone, threads)
        return super().load_model()

    def run_inference(self, batch: Sequence[np.ndarray], inference_session: ort.InferenceSession,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[PredictionResult]:
        features = self._model_inference_fn(inference_session, batch, inference_args)
        # Beam's handler would keep each input image beside its result (150 KB each).
        return [PredictionResult(None, f) for f in features]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)  # Beam's counts one element's itemsize

    def get_metrics_namespace(self) -> str:
        return "dn2"
