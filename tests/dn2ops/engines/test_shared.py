"""One model per machine (dn2ops.engines.shared): when it is shared, what its proxy
returns, and that its server answers only the pipeline's own key."""

from __future__ import annotations

import multiprocessing.managers
import subprocess
import sys
import uuid

import numpy as np
import pytest
from apache_beam.utils import multi_process_shared

from dn2ops.config import EmbedConfig
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.auto import make_handler
from dn2ops.engines.base import cuda_available, shares_model, thread_plan, usable_cores
from dn2ops.engines.onnxruntime import OnnxBackboneModelHandler
from dn2ops.engines.shared import Served, SharedModelHandler

BACKBONE = "efficientnet_lite0"


def _plan(shared: bool, workers: int | None = 4, **config) -> EmbedPlan:
    return EmbedPlan(EmbedConfig(backbone=BACKBONE, batch_size=8, **config), get_spec(BACKBONE),
                     weights_sha256="", workers=workers, shared=shared)


@pytest.mark.parametrize("config, processes, expected", [
    ({}, 1, False),  # one process (or threads): nothing to share
    ({}, 4, not cuda_available()),  # local multi_processing: the engine this machine runs
    ({}, None, False),  # Dataflow, --device auto: the workers may have a GPU
    ({"device": "cpu"}, None, True),  # Dataflow CPU workers, one SDK process a vCPU
    ({"engine": "onnxruntime"}, None, True),
    ({"engine": "torch", "device": "cuda"}, 4, False),  # a GPU's model: not by auto
    ({"share_model": "on"}, 1, True),
    ({"share_model": "off", "device": "cpu"}, None, False),
])
def test_when_the_model_is_shared(config, processes, expected):
    assert shares_model(EmbedConfig(**config), processes) is expected


def test_a_shared_model_runs_on_every_core_and_decoding_keeps_its_share():
    cores = usable_cores()
    assert thread_plan(_plan(shared=True, workers=4)) == (cores, max(1, cores // 4))
    assert thread_plan(_plan(shared=False, workers=4)) == (max(1, cores // 4),) * 2


def test_a_shared_plan_wraps_its_engine_handler():
    handler = make_handler(_plan(shared=True, engine="onnxruntime"))
    assert type(handler) is SharedModelHandler
    assert type(handler.inner) is OnnxBackboneModelHandler
    assert handler.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 8}
    assert type(make_handler(_plan(shared=False, engine="onnxruntime"))) is \
        OnnxBackboneModelHandler


def test_a_process_that_only_calls_the_shared_model_does_not_import_the_engine(tmp_path):
    """Every SDK process unpickles the handler; only the serving one loads ONNX Runtime."""
    from apache_beam.internal import pickler

    path = tmp_path / "handler.pkl"
    path.write_bytes(pickler.dumps(make_handler(_plan(shared=True, engine="onnxruntime"))))
    code = ("import sys\nfrom apache_beam.internal import pickler\n"
            f"handler = pickler.loads(open({str(path)!r}, 'rb').read())\n"
            "print(type(handler.inner).__name__, 'onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["OnnxBackboneModelHandler", "False"]


def test_the_served_model_returns_what_its_engine_returns(real_batch):
    inner = OnnxBackboneModelHandler(EmbedPlan.resolve(
        EmbedConfig(backbone=BACKBONE, engine="onnxruntime", device="cpu", batch_size=8),
        workers=4, shared=True))
    model = inner.load_model()
    direct = np.stack([r.inference for r in inner.run_inference(list(real_batch), model)])
    served = Served(inner, model)
    got = SharedModelHandler(inner, 8).run_inference(list(real_batch), served)
    assert np.array_equal(np.stack([r.inference for r in got]), direct)
    assert direct.shape == (len(real_batch), 1280) and np.abs(direct).max() > 1.0


class _Echo:
    def twice(self, x):
        return 2 * x


def test_the_server_refuses_beams_default_key(tmp_path):
    """Beam's own key (b'mps') is the same everywhere: a handler draws its own, and a
    client holding Beam's is refused by a server that holds the handler's."""
    saved = multi_process_shared.AUTH_KEY
    a, b = SharedModelHandler(None, 8), SharedModelHandler(None, 8)
    try:
        assert a.share_model_across_processes() is True
        assert multi_process_shared.AUTH_KEY == a.key != saved
        assert len(a.key) == 32 and a.key != b.key
        tag = uuid.uuid4().hex
        shared = multi_process_shared.MultiProcessShared(_Echo, tag=tag, path=str(tmp_path),
                                                         always_proxy=True)
        assert shared.acquire().twice(21) == 42  # the pipeline's own key: served
        host, port = (tmp_path / f"{tag}.address").read_text().split(":")
        with pytest.raises(multiprocessing.AuthenticationError):
            multiprocessing.managers.BaseManager(address=(host, int(port)),
                                                 authkey=saved).connect()
    finally:
        multi_process_shared.AUTH_KEY = saved
