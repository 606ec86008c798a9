"""What draft decoding and the engines change in the features, on real images.

For N phone photos (benchmarks.datasets.write_photo_store) and N Fashion-MNIST test
PNGs, every image goes through dn2's own prepare() twice, ``--decode full`` and
``--decode draft``, and the crops through the torch engine; the draft crops also
through every other CPU engine. Reported, each against torch on full decoding
(dn2's previous path): max and mean |feature difference|, the feature scale
(max |feature|), the mean cosine similarity, and for decoding the mean
|pixel difference| of the uint8 crops.

    python benchmarks/decode_diff.py --photos DIR [--photo-images 64]
        [--fashion-images 500] [--out bench-out/decode_diff]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

from benchmarks.embed_workloads import stores  # noqa: E402
from dn2ops.config import EmbedConfig  # noqa: E402
from dn2ops.embed.backbones import get_spec  # noqa: E402
from dn2ops.embed.plan import EmbedPlan  # noqa: E402
from dn2ops.embed.stage import prepare  # noqa: E402
from dn2ops.engines.auto import make_handler  # noqa: E402
from dn2ops.engines.base import installed  # noqa: E402

BACKBONE = "efficientnet_lite0"


def crops(files: list[str], decode: str) -> np.ndarray:
    pre = get_spec(BACKBONE).preprocessing
    return np.stack([prepare({"uri": f}, pre, decode=decode)[1] for f in files])


def embed(engine: str, x: np.ndarray, batch: int = 64) -> np.ndarray:
    handler = make_handler(EmbedPlan.resolve(EmbedConfig(
        backbone=BACKBONE, engine=engine, device="cpu", threads=os.cpu_count())))
    model = handler.load_model()
    return np.concatenate([np.stack([r.inference for r in handler.run_inference(
        list(x[a:a + batch]), model)]) for a in range(0, len(x), batch)])


def compare(a: np.ndarray, ref: np.ndarray) -> dict:
    d = np.abs(a - ref)
    cos = (a * ref).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(ref, axis=1)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "scale": float(np.abs(ref).max()), "mean_cosine": float(cos.mean()),
            "min_cosine": float(cos.min())}


def workload(files: list[str]) -> dict:
    full, draft = crops(files, "full"), crops(files, "draft")
    ref = embed("torch", full)
    res = {"images": len(files),
           "pixels_mean_abs_diff": float(np.abs(full.astype(int) - draft).mean()),
           "draft_torch_vs_full_torch": compare(embed("torch", draft), ref)}
    for engine in ("openvino", "onnxruntime"):
        if installed(engine):
            res[f"full_{engine}_vs_full_torch"] = compare(embed(engine, full), ref)
            res[f"draft_{engine}_vs_full_torch"] = compare(embed(engine, draft), ref)
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", default=None)
    p.add_argument("--photo-images", type=int, default=64)
    p.add_argument("--fashion-images", type=int, default=500)
    p.add_argument("--out", default="bench-out/decode_diff")
    args = p.parse_args(argv)
    photos, fashion = stores(args.out, args.photos, args.photo_images, args.fashion_images)
    res = {"photos": workload(photos), "fashion": workload(fashion)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_diff.json"), "w") as f:
        json.dump(res, f, indent=2)
    for name, w in res.items():
        print(f"{name} ({w['images']} images; crops' mean |pixel diff| draft vs full "
              f"{w['pixels_mean_abs_diff']:.2f} levels):")
        for key, c in w.items():
            if isinstance(c, dict):
                print(f"  {key:<32} max {c['max_abs']:.2e} mean {c['mean_abs']:.2e} "
                      f"(scale {c['scale']:.2f}) cosine mean {c['mean_cosine']:.6f} "
                      f"min {c['min_cosine']:.6f}")
    return res


if __name__ == "__main__":
    main()
