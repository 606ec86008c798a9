"""What the default backbone costs against Lite0, model only: the second network, the
larger crop, one exported graph against two, the engine's batch.

dn2's default backbone, efficientnet_lite0+efficientnet_lite1, runs both networks on every
image at Lite1's 240 crop, as one exported graph. Here each piece runs alone on ONNX
Runtime, as dn2 exports and runs it (uint8 input, arena off, every core of this machine),
on the same random uint8 batch, interleaved round by round (the best of --rounds per
way), so that the machine's load falls on every way alike:

* lite0 @ 224 (Lite0 alone, as ``--backbone efficientnet_lite0`` runs it);
* lite0 @ 240 (the crop's cost alone);
* lite1 @ 240;
* lite0 + lite1 @ 240, two graphs run one after the other;
* the default: both in one graph @ 240;
each at engine batches 8, 16 and 64 (images/s of the model alone, no decoding).

    python benchmarks/backbone_cost.py [--rounds 5] [--images 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
    sys.path.insert(0, REPO)

import tempfile  # noqa: E402

import onnxruntime as ort  # noqa: E402

from benchmarks.markdown import table  # noqa: E402
from dn2ops.config import DEFAULT_BACKBONE, EmbedConfig  # noqa: E402
from dn2ops.embed import exporter  # noqa: E402
from dn2ops.embed.backbones import get_spec, load_backbone  # noqa: E402
from dn2ops.embed.export import OPSET, exported_model  # noqa: E402
from dn2ops.embed.plan import EmbedPlan  # noqa: E402
from dn2ops.engines.base import usable_cores  # noqa: E402
from dn2ops.engines.onnxruntime import session_options  # noqa: E402

BATCHES = (8, 16, 64)


def session(backbone: str, crop: int | None = None) -> ort.InferenceSession:
    """dn2's export of ``backbone`` (its exported graph has the crop's fixed size; another
    ``crop``: exported here, into a temporary file, the same way)."""
    if crop is None:
        path = exported_model(EmbedPlan.resolve(EmbedConfig(backbone=backbone)))
    else:
        path = os.path.join(tempfile.mkdtemp(), f"{backbone}-{crop}.onnx")
        module = exporter.Normalized(load_backbone(backbone), get_spec(backbone).preprocessing)
        exporter.to_onnx(module.eval(), crop, path, OPSET)
    return ort.InferenceSession(path, session_options(usable_cores()),
                                providers=["CPUExecutionProvider"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args(argv)
    lite0, lite1 = session("efficientnet_lite0"), session("efficientnet_lite1")
    lite0_240, default = session("efficientnet_lite0", 240), session(DEFAULT_BACKBONE)
    rng = np.random.default_rng(0)
    x224 = rng.integers(0, 256, (args.images, 3, 224, 224), dtype=np.uint8)
    x240 = rng.integers(0, 256, (args.images, 3, 240, 240), dtype=np.uint8)
    ways = {"lite0 @ 224": [(lite0, x224)], "lite0 @ 240": [(lite0_240, x240)],
            "lite1 @ 240": [(lite1, x240)],
            "lite0 + lite1 @ 240, two graphs": [(lite0_240, x240), (lite1, x240)],
            "default: one graph @ 240": [(default, x240)]}
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for way, runs in ways.items():
            for b in BATCHES:
                started = time.perf_counter()
                for s, x in runs:
                    for i in range(0, len(x), b):
                        s.run(None, {"images": x[i:i + b]})
                rate = args.images / (time.perf_counter() - started)
                best[way, b] = max(best.get((way, b), 0.0), rate)
    base = best["lite0 @ 224", 16]
    rows = [[way] + [f"{best[way, b]:.1f}" for b in BATCHES]
            + [f"{best[way, 16] / base:.2f}"] for way in ways]
    print(f"ONNX Runtime {ort.__version__}, {usable_cores()} cores, best of {args.rounds}")
    print(table(["model", *(f"images/s at batch {b}" for b in BATCHES),
                 "vs lite0 @ 224 (batch 16)"], rows))
    return {f"{w} | {b}": v for (w, b), v in best.items()}


if __name__ == "__main__":
    main()
