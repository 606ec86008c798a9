"""One model per machine: an engine's handler whose model the SDK processes share.

Beam's RunInference loads a model once per SDK process unless its handler says
``share_model_across_processes()``: then the first process to load it serves it (Beam's
``multi_process_shared``, a ``multiprocessing`` manager on 127.0.0.1) and every process
calls it through a proxy. dn2 shares the CPU engines' model when several SDK processes
run on one machine (dn2ops.engines.base.shares_model: ``--direct_running_mode
multi_processing``, or a Dataflow CPU worker's one process per vCPU): one model and one
engine working set a machine instead of one a process, the model's calls run one at a
time on all the machine's cores (thread_plan), and each process keeps its cores for
reading and decoding. Measured in docs/memory.md ("Embedding workers").

What crosses the proxy: a call's batch of uint8 images (N x 3 x crop x crop, pickled)
and its (N, dim) float32 features back. A proxy speaks pickle with whoever answers on
the manager's port, and Beam's default key (``multi_process_shared.AUTH_KEY``) is the
same in every Beam install, so any local user could drive the server, or stand in for
it. The handler therefore carries a key of its own, drawn at launch
(``secrets.token_bytes``) and pickled with the pipeline to its workers, and sets it as
Beam's key in each process before Beam's RunInference connects
(``share_model_across_processes`` is what RunInference calls right before).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from apache_beam.utils import multi_process_shared

from dn2ops.engines.base import Dn2ModelHandler


class Served:
    """The model as the serving process holds it: ``features`` runs the inner handler on
    one call's batch, one call at a time (each proxy connection is a thread of the
    server; the engine already uses every core)."""

    def __init__(self, handler: ModelHandler, model: Any):
        self.handler, self.model = handler, model
        self.lock = threading.Lock()

    def features(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        with self.lock:
            results = list(self.handler.run_inference(batch, self.model))
        return np.stack([r.inference for r in results])


def use_key(key: bytes) -> None:
    """Beam's multi_process_shared authenticates with ``key`` in this process."""
    multi_process_shared.AUTH_KEY = key


class SharedModelHandler(Dn2ModelHandler[np.ndarray, PredictionResult, Served]):
    """``inner`` (an engine's handler), its model served once per machine."""

    def __init__(self, inner: Dn2ModelHandler, batch_size: int):
        super().__init__(batch_size=batch_size)
        self.inner = inner
        self.key = secrets.token_bytes(32)

    def share_model_across_processes(self) -> bool:
        use_key(self.key)
        return True

    def load_model(self) -> Served:  # runs in the serving process only
        return Served(self.inner, self.inner.load_model())

    def run_inference(self, batch: Sequence[np.ndarray], model: Served,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[PredictionResult]:
        return [PredictionResult(None, f) for f in model.features(list(batch))]
