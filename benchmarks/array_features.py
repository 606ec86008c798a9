"""Features of an in-memory image array through dn2's engine, cached as .npy.

The accuracy protocols embed whole datasets (Fashion-MNIST: 70,000 images) once per
backbone; every table is then computed from the cached features. The images go through
exactly what ``dn2 embed`` runs after decoding: grey -> RGB (dn2ops.embed.images), the
backbone's resize and centre crop (``Preprocessing.crop_image``), and the engine's Beam
model handler (``dn2ops.engines.auto.make_handler``; ONNX Runtime on a CPU by default, whose
exported graph normalises the uint8 batch). A lossless PNG of the image decodes to the
same array, so the features are those of ``dn2 embed`` on a PNG store, without the PNG
files, the Beam runner and the Parquet shards around them.

Cache files: ``{cache}/{name}.npy`` (n, dim) float32 in the array's order and
``{cache}/{name}.json`` (images, seconds, images/s, engine, batch size, threads).
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
from PIL import Image

from dn2ops.config import EmbedConfig
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.plan import EmbedPlan
from dn2ops.engines.auto import make_handler
from dn2ops.engines.base import resolve_engine, usable_cores

LOG = logging.getLogger("dn2.bench")


def crops(images: np.ndarray, backbone: str) -> list[np.ndarray]:
    """Grey uint8 images (n, H, W) -> the backbone's uint8 crops, each (3, crop, crop)."""
    prep = get_spec(backbone).preprocessing
    return [prep.crop_image(Image.fromarray(np.ascontiguousarray(x)).convert("RGB"))
            for x in images]


def embed(images: np.ndarray, backbone: str, *, engine: str = "auto", batch_size: int = 16,
          threads: int | None = None) -> tuple[np.ndarray, dict]:
    """Grey uint8 images (n, H, W) -> (features (n, dim) float32, timing facts).

    The timing covers the crops and the model calls (not the model load), on one
    process: ``threads`` engine threads (default: every usable core).
    """
    threads = threads or usable_cores()
    plan = EmbedPlan.resolve(EmbedConfig(backbone=backbone, engine=engine, device="cpu",
                                         batch_size=batch_size, threads=threads,
                                         decode_threads=1))
    handler = make_handler(plan)
    model = handler.load_model()
    out = np.empty((len(images), plan.spec.dim), np.float32)
    t0 = time.perf_counter()
    for at in range(0, len(images), batch_size):
        batch = crops(images[at:at + batch_size], backbone)
        results = handler.run_inference(batch, model)
        out[at:at + len(batch)] = np.stack([r.inference for r in results])
        if at // batch_size % 200 == 0:
            LOG.info("%s: %d / %d images, %.1f images/s", backbone, at + len(batch),
                     len(images), (at + len(batch)) / (time.perf_counter() - t0))
    seconds = time.perf_counter() - t0
    facts = {"images": len(images), "seconds": round(seconds, 2),
             "images_per_second": round(len(images) / seconds, 2), "backbone": backbone,
             "engine": resolve_engine(engine, "cpu"), "batch_size": batch_size,
             "threads": threads, "cores": usable_cores()}
    return out, facts


def cached(cache: str, name: str, images: np.ndarray, backbone: str, **kw) -> np.ndarray:
    """``embed`` once: the features of ``{cache}/{name}.npy`` if there, else embedded and saved."""
    path = os.path.join(cache, name)
    if os.path.exists(path + ".npy"):
        X = np.load(path + ".npy")
        if X.shape[0] != len(images):
            raise ValueError(f"{path}.npy holds {X.shape[0]} rows, expected {len(images)}")
        return X
    X, facts = embed(images, backbone, **kw)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path + ".tmp.npy", X)
    os.replace(path + ".tmp.npy", path + ".npy")
    with open(path + ".json", "w") as f:
        json.dump(facts, f, indent=2)
    LOG.info("%s: %s", name, facts)
    return X


def facts(cache: str, name: str) -> dict | None:
    """The timing facts recorded when ``name`` was embedded (None if never)."""
    path = os.path.join(cache, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
