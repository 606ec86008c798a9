"""``--engine onnxruntime``: dn2's exported backbone on ONNX Runtime, as a Beam model handler.

``load_model()`` exports the backbone (cached on local disk by dn2ops.embed.export) and
opens the file in an ``InferenceSession`` on the CPU, with the threads of
dn2ops.engines.base.thread_plan; results do not carry their input images.

dn2's own handler rather than Beam's ``OnnxModelHandlerNumpy``: Beam's module
imports the ``onnx`` package (and with it ml_dtypes) to read the file with
``onnx.load`` and serialise it again, which costs every worker process ~1.2 s of
CPU at start (measured: ``import pipelines.embed, dn2ops.engines.onnxruntime`` 5.9 s of
CPU against 4.6 s with ``onnxruntime`` alone); ONNX Runtime reads the file itself.

``onnxruntime`` itself is imported where a session is made, not with this module: with a
model shared by a machine's SDK processes (dn2ops.engines.shared) every process unpickles
this handler, and only the one that serves the model needs the engine (0.1 s and 36 MB
a process that does not).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from apache_beam.ml.inference.base import PredictionResult

from dn2ops.embed.export import exported_model
from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.base import Dn2ModelHandler, engine_batch, in_slices, thread_plan

if TYPE_CHECKING:
    import onnxruntime as ort

LOG = logging.getLogger("dn2")


def session_options(threads: int) -> ort.SessionOptions:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # a CNN is one chain of operators
    # Idle intra-op threads would spin for a while after each batch, taking the
    # cores from the threads that read and decode the next images.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The CPU arena stays on (ONNX Runtime's default): it keeps the largest working set
    # seen, and the engine batch bounds that (dn2ops.config.CPU_ENGINE_BATCH). Without it
    # every run allocates and frees its buffers again, which cost dn2 embed a third of its
    # speed on PNGs (docs/memory.md, "Embedding workers").
    return options


class OnnxBackboneModelHandler(Dn2ModelHandler[np.ndarray, PredictionResult, Any]):
    """uint8 batches (N, 3, crop, crop) -> pooled backbone features (dim,) float32, run
    in slices of dn2ops.engines.base.engine_batch images."""

    def __init__(self, plan: EmbedPlan):
        super().__init__(batch_size=plan.config.batch_size)
        self.plan = plan
        self.engine_batch = engine_batch(plan.config, gpu=False)

    def load_model(self) -> ort.InferenceSession:
        import onnxruntime as ort

        threads, _ = thread_plan(self.plan)
        path = exported_model(self.plan)  # the torch backbone is loaded only to export it
        LOG.info("engine onnxruntime %s: %s, %d threads", ort.__version__,
                 self.plan.backbone, threads)
        return ort.InferenceSession(path, session_options(threads),
                                    providers=["CPUExecutionProvider"])

    def run_inference(self, batch: Sequence[np.ndarray], inference_session: ort.InferenceSession,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[PredictionResult]:
        name = inference_session.get_inputs()[0].name
        features = in_slices(lambda x: inference_session.run(None, {name: x})[0], batch,
                             self.engine_batch)
        # Beam's handlers keep each input image beside its result (150 KB each).
        return [PredictionResult(None, f) for f in features]
