"""Embedding images/s on two workloads, each way timed as a whole process, side by side.

Workloads: N phone-sized 12 MP JPEGs made from real photographs
(benchmarks.datasets.write_photo_store: scikit-learn's sample photos cropped, scaled
up to 4032 x 3024 with sensor noise, quality 90, every fourth a portrait by
EXIF), and N Fashion-MNIST test PNGs (28 x 28, Debian's package).

Ways, each a fresh process whose wall time is measured from outside (interpreter
start, imports, model load and compile, decoding, inference, writing):

* ``dn2``: ``dn2 embed --input STORE --output DIR --backbone efficientnet_lite0`` with
  its other defaults (``--engine auto --decode draft``, threads from the cores);
* ``default``: ``dn2 embed`` with all its defaults, i.e. its default backbone
  (efficientnet_lite0+efficientnet_lite1, both run on every image): what dn2's
  accuracy costs against ``dn2``;
* ``bare``: a plain loop, nothing but PIL and the engine: draft decode, EXIF
  transpose, PIL resize and crop, batches of 64 through the engine ``auto``
  picks on this machine (all cores), run on dn2's export of the backbone (made
  beforehand: the export cache is warm for every way, as on a worker that has
  exported once);
* ``previous``: dn2's path before draft decoding, the engines and the prefetch:
  ``dn2 embed --engine torch --decode full --reads-in-flight 1 --threads N``
  (torch on all N cores, one image read and decoded at a time);
* ``baseline`` (with ``--baseline-repo``): ``dn2 embed`` of another checkout
  (the code before this round), run with that checkout's own Python.

Every file is read once before each way (and before the decode timing), so every
way finds the files in the page cache alike. Also, in this process: decode + crop
milliseconds per image, full against draft.

    python benchmarks/embed_workloads.py --photos DIR --photo-images 256 \\
        --fashion-images 2000 [--out bench-out/embed] [--baseline-repo /work/baseline] \\
        [--ways bare,dn2,default,previous]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 64
BACKBONE = "efficientnet_lite0"


# -- the bare loop (its own process: only PIL, numpy and the engine imported) -----------


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere (benchmarks.datasets)
    sys.path.insert(0, REPO)

def bare_pixels(data: bytes, resize: int, crop: int) -> np.ndarray:
    """JPEG bytes -> uint8 (3, crop, crop): draft, EXIF, RGB, resize short side, crop."""
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (resize, resize))
    im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    im = im.resize(size, Image.BILINEAR)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    return np.asarray(im.crop((left, top, left + crop, top + crop))).transpose(2, 0, 1)


def bare_session(engine: str, model: str, threads: int):
    """A callable uint8 batch -> features, on the exported model at ``model``."""
    if engine == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        return lambda x: request.infer({0: x})[compiled.output(0)].copy()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


def bare_main(manifest: str, engine: str, model: str, out: str, threads: int) -> None:
    import csv

    with open(manifest, newline="") as f:
        files = [row["uri"] for row in csv.DictReader(f)]
    run = bare_session(engine, model, threads)
    feats = []
    for a in range(0, len(files), BATCH):
        batch = []
        for path in files[a:a + BATCH]:
            with open(path, "rb") as f:
                batch.append(bare_pixels(f.read(), 256, 224))
        feats.append(run(np.stack(batch)))
    np.save(out, np.concatenate(feats))


# -- the side-by-side run --------------------------------------------------------------


def timed(cmd: list[str], cwd: str = REPO) -> float:
    """Wall seconds of a whole process; fails loudly when it fails."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds


def ways(store: str, out: str, engine: str, model: str, cores: int,
         baseline_repo: str | None) -> dict[str, list[str]]:
    dn2 = [sys.executable, "-m", "pipelines.cli", "embed", "--input", store]
    cmds = {
        "default": dn2 + ["--output", os.path.join(out, "default")],
        "bare": [sys.executable, os.path.abspath(__file__), "--bare", store, "--engine", engine,
                 "--model", model, "--threads", str(cores),
                 "--bare-out", os.path.join(out, "bare.npy")],
        "dn2": dn2 + ["--output", os.path.join(out, "dn2"), "--backbone", BACKBONE],
        "previous": dn2 + ["--output", os.path.join(out, "previous"), "--backbone", BACKBONE,
                           "--engine", "torch",
                           "--decode", "full", "--reads-in-flight", "1", "--threads", str(cores)],
    }
    if baseline_repo:
        cmds["baseline"] = [os.path.join(baseline_repo, ".venv", "bin", "python"), "-m",
                            "pipelines.cli", "embed", "--input", store, "--output",
                            os.path.join(out, "baseline")]
    return cmds


def warm(files: list[str]) -> None:
    """Reads every file once: the timings that follow find them in the page cache."""
    for path in files:
        with open(path, "rb") as f:
            while f.read(1 << 22):
                pass


def decode_ms(files: list[str], decode: str) -> float:
    """Median ms per image of read + decode + crop, as dn2's prepare() does it."""
    from dn2ops.embed.backbones import get_spec
    from dn2ops.embed.stage import prepare

    pre = get_spec(BACKBONE).preprocessing
    times = []
    for path in files:
        t = time.perf_counter()
        prepare({"uri": path}, pre, decode=decode)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def workload(name: str, files: list[str], out: str, args, engine: str, model: str) -> dict:
    import shutil

    from benchmarks.datasets import write_manifest

    store = os.path.join(out, "images.csv")  # every way reads this manifest
    write_manifest([{"uri": os.path.abspath(f)} for f in files], store)
    res = {"images": len(files), "seconds": {}, "decode_ms": {}}
    for decode in ("full", "draft"):
        warm(files[:32])
        res["decode_ms"][decode] = decode_ms(files[:32], decode)
    cmds = ways(store, out, engine, model, args.cores, args.baseline_repo)
    cmds = {w: c for w, c in cmds.items() if w in args.ways or w == "baseline"}
    for way, cmd in cmds.items():
        target = os.path.join(out, way)
        shutil.rmtree(target, ignore_errors=True)
        warm(files)
        res["seconds"][way] = timed(cmd, cwd=args.baseline_repo if way == "baseline" else REPO)
        print(f"{name}: {way:<9} {res['images'] / res['seconds'][way]:7.2f} images/s "
              f"({res['seconds'][way]:.1f} s, whole process)", flush=True)
    ips = {w: res["images"] / s for w, s in res["seconds"].items()}
    res["images_per_s"] = ips
    pairs = {"dn2_over_bare": ("dn2", "bare"), "dn2_over_previous": ("dn2", "previous"),
             "default_over_dn2": ("default", "dn2")}
    res["ratios"] = {r: ips[a] / ips[b] for r, (a, b) in pairs.items() if a in ips and b in ips}
    if "baseline" in ips:
        res["ratios"]["dn2_over_baseline"] = ips["dn2"] / ips["baseline"]
    if "dn2" in ips and "previous" in ips:
        res["feature_diff"] = feature_diff(out)
    return res


def feature_diff(out: str) -> dict:
    """max / mean |dn2 features - previous path's| (engine and decode together), by uri."""
    from dn2ops.io.features import load_features

    rows = {}
    for way in ("dn2", "previous"):
        table, X, _ = load_features(os.path.join(out, way))
        rows[way] = dict(zip(table.column("uri").to_pylist(), X, strict=True))
    uris = sorted(rows["dn2"])
    a = np.stack([rows["dn2"][u] for u in uris])
    b = np.stack([rows["previous"][u] for u in uris])
    d = np.abs(a - b)
    return {"max": float(d.max()), "mean": float(d.mean()), "scale": float(np.abs(b).max())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", default=None, help="folder of the photo store (made if missing)")
    p.add_argument("--photo-images", type=int, default=256)
    p.add_argument("--fashion-images", type=int, default=2000)
    p.add_argument("--out", default="bench-out/embed")
    p.add_argument("--baseline-repo", default=None)
    p.add_argument("--ways", default="bare,dn2,default,previous",
                   help="comma-separated ways to time (baseline: with --baseline-repo)")
    p.add_argument("--bare", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bare-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.ways = args.ways.split(",")
    if args.bare:
        bare_main(args.bare, args.engine, args.model, args.bare_out, args.threads)
        return {}
    return run(args)


def stores(out: str, photos: str | None, n_photos: int, n_fashion: int
           ) -> tuple[list[str], list[str]]:
    """(paths of n_photos phone photos, of n_fashion Fashion-MNIST test PNGs), made if missing
    (the photos under ``photos``, default OUT/photos; the PNGs under OUT/fashion-store)."""
    from benchmarks.datasets import load_fashion_mnist, write_photo_store, write_png_store

    paths = write_photo_store(photos or os.path.join(out, "photos"), n_photos)
    images, _ = load_fashion_mnist(split="test")
    return paths, write_png_store(images[:n_fashion], [f"{i:05d}" for i in range(n_fashion)],
                                  os.path.join(out, "fashion-store"))


def run(args) -> dict:
    from dn2ops.embed.export import export_backbone
    from dn2ops.engines.base import resolve_engine, usable_cores

    args.cores = usable_cores()
    engine = resolve_engine("auto", "cpu")
    if engine == "torch":
        raise SystemExit("no CPU engine installed (pip install openvino)")
    t = time.perf_counter()
    model = export_backbone(BACKBONE)  # warms the cache every way uses
    res = {"cores": args.cores, "engine": engine, "export_seconds": time.perf_counter() - t,
           "workloads": {}}
    photos, fashion = stores(args.out, args.photos, args.photo_images, args.fashion_images)
    for name, files in (("photos", photos), ("fashion", fashion)):
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        res["workloads"][name] = workload(name, files, out, args, engine, model)
    with open(os.path.join(args.out, "embed.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(markdown(res))
    return res


def markdown(res: dict) -> str:
    ways = list(next(iter(res["workloads"].values()))["images_per_s"])
    ratios = list(next(iter(res["workloads"].values()))["ratios"])
    names = {"dn2": "dn2 embed (lite0)", "default": "dn2 embed (default backbone)",
             "bare": "bare loop (lite0)", "previous": "previous (torch, full)"}
    lines = [f"Embedding images/s, whole processes, {res['cores']} cores (bare loop: "
             f"{res['engine']}, batch 64):", "",
             "| workload | N | " + " | ".join(names.get(w, w) for w in ways) + " | "
             + " | ".join(r.replace("_over_", " / ") for r in ratios)
             + " | decode+crop ms full -> draft |",
             "|---|---|" + "---|" * (len(ways) + len(ratios) + 1)]
    for name, w in res["workloads"].items():
        dm = w["decode_ms"]
        lines.append(f"| {name} | {w['images']} | "
                     + " | ".join(f"{w['images_per_s'][x]:.2f}" for x in ways) + " | "
                     + " | ".join(f"{w['ratios'][r]:.2f}" for r in ratios)
                     + f" | {dm['full']:.1f} -> {dm['draft']:.1f} |")
    for name, w in res["workloads"].items():
        d = w.get("feature_diff")
        if d:
            lines.append(f"- {name}: |dn2 - previous| features max {d['max']:.2e}, mean "
                         f"{d['mean']:.2e} (scale {d['scale']:.2f})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
