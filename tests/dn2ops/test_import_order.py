"""torch and faiss each bring OpenMP: both import orders must work, also in forked workers.

Runs in fresh interpreters (the import order of this test process is already fixed) and
does what a Beam worker does: embed with torch, then search with faiss with its threads
capped by dn2ops.index.knn.set_faiss_threads, in the parent and in forked children.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import {first}
import {second}
import multiprocessing as mp
import numpy as np
import torch
from dn2ops.index.knn import knn, set_faiss_threads

def work(seed):
    set_faiss_threads(1)  # what dn2ops.score.images does in every worker's setup
    rng = np.random.default_rng(seed)
    xb, xq = rng.random((2000, 64), np.float32), rng.random((50, 64), np.float32)
    feats = torch.nn.functional.relu(torch.from_numpy(xq) @ torch.ones(64, 8))
    D, _ = knn(xq, xb, 2)
    return float(D.sum()) + float(feats.sum())

parent = work(0)
with mp.get_context("fork").Pool(2) as pool:
    # A hung child shows as a TimeoutError here rather than a stuck test.
    children = [pool.apply_async(work, (s,)).get(timeout=60) for s in (0, 1)]
assert abs(children[0] - parent) < 1e-3 * abs(parent), (children, parent)
print("ok", parent)
"""


# The orders a dn2 process can meet: a stage module that uses faiss imported before
# torch, or after it, or the command-line entry point.
@pytest.mark.parametrize("first, second", [("dn2ops.index.knn", "torch"),
                                           ("torch", "dn2ops.index.knn"),
                                           ("pipelines.cli", "dn2ops.score.images")])
def test_torch_and_faiss_in_either_order_and_in_forked_workers(first, second):
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(first=first, second=second)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")


EMBED_WORKER = """
import sys
import numpy as np
import dn2ops  # first, as when a worker unpickles dn2's functions
import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.util import assert_that, equal_to
import dn2ops.embed.stage, dn2ops.engines.onnxruntime, pipelines.graphs, pipelines.finalize
from dn2ops.engines.base import Dn2ModelHandler

class Model:
    factor = 2

class Doubler(Dn2ModelHandler):
    def load_model(self):
        return Model()
    def run_inference(self, batch, model, inference_args=None):
        return [int(model.factor * x.sum()) for x in batch]

with beam.Pipeline() as p:
    got = (p | beam.Create([1, 2, 3]) | beam.Map(lambda i: np.full(2, i))
           | RunInference(Doubler(batch_size=2, min_batch_size=1)))
    assert_that(got, equal_to([4, 8, 12]))
assert "torch" not in sys.modules, "torch was imported"
import apache_beam.ml.inference.base as base
assert base.resource is not None  # Beam's memory figures still work
assert "faiss" not in sys.modules, "faiss was imported"
print("ok")
"""


def test_an_embedding_worker_runs_inference_without_torch_or_faiss():
    """What a worker that embeds with ONNX Runtime loads (dn2ops.__init__ keeps Beam's
    model manager, and with it torch, out; the embedding and finalize modules import no
    index): RunInference still runs."""
    proc = subprocess.run([sys.executable, "-c", EMBED_WORKER], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
