"""Embedding at object-store latency: images/s from local disk and from a store that
answers every read after a fixed delay, with reads one at a time and concurrent.

The store is the same image files seen through ``slow://`` (SlowFileSystem below: every
opened file waits ``--delay-ms`` first, as a bucket answers a small GET after 20-100 ms).
Each configuration runs the whole ``dn2 embed`` (listing, reading, decoding, embedding,
Parquet writes, commit) in this process, in one run, interleaved so that load on the
machine hits all alike; images/s = images / wall seconds of the command. A second table
times the prepare stage alone (list, read, decode, crop: a Beam pipeline without the
model), the rate at which a worker can feed its model: on a GPU worker, whose model is
far faster than this CPU's, that is what bounds embedding.

    python benchmarks/read_latency.py [--images 500] [--delay-ms 50] [--reads-in-flight 16]
        [--out bench-out/read_latency]

Target (issue 14): the store at 50 ms per read, concurrent reads, at >= 0.8 of local disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import apache_beam as beam
import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere (benchmarks.datasets)
    sys.path.insert(0, REPO)

from benchmarks.datasets import load_fashion_mnist, write_png_store  # noqa: E402
from dn2ops.config import DEFAULT_MAX_PIXELS  # noqa: E402
from dn2ops.embed.backbones import get_spec  # noqa: E402
from dn2ops.embed.stage import ERRORS, PrepareImages  # noqa: E402
from dn2ops.io.sources import ListImages  # noqa: E402
from pipelines.cli import main as dn2  # noqa: E402
from pipelines.options import beam_options  # noqa: E402

PROTOCOL = "slow"


class SlowFileSystem(AbstractFileSystem):
    """Local files as ``slow:///abs/path``; opening one for reading waits ``delay_s`` first.

    ``delay_s`` comes from fsspec's configuration (``fsspec.config.conf["slow"]``), so that
    every instance the pipeline creates by URL has it.
    """

    protocol = PROTOCOL
    root_marker = "/"

    def __init__(self, delay_s: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.delay_s = delay_s
        self.local = LocalFileSystem()

    def ls(self, path, detail=True, **kwargs):
        entries = self.local.ls(self._strip_protocol(path), detail=True)
        return entries if detail else [e["name"] for e in entries]

    def info(self, path, **kwargs):
        return self.local.info(self._strip_protocol(path))

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            time.sleep(self.delay_s)  # the store's answer to one GET
        return self.local._open(self._strip_protocol(path), mode, **kwargs)


fsspec.register_implementation(PROTOCOL, SlowFileSystem, clobber=True)


def make_store(directory: str, n: int) -> str:
    """n Fashion-MNIST test images (Debian's package) as PNGs; returns the directory."""
    if not os.path.isdir(directory) or len(os.listdir(directory)) != n:
        shutil.rmtree(directory, ignore_errors=True)
        images, _ = load_fashion_mnist(split="test")
        write_png_store(images[:n], [f"img{i:05d}" for i in range(n)], directory)
    return directory


def embed_rate(src: str, out: str, reads_in_flight: int, n: int, batch_size: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    code = dn2(["embed", "--input", src, "--output", out, "--batch-size", str(batch_size),
                "--reads-in-flight", str(reads_in_flight)])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"dn2 embed failed on {src}")
    with open(os.path.join(out, "_SUCCESS")) as f:
        marker = json.load(f)
    assert marker["embedded"] == n, marker  # every image read and embedded, none errored
    return n / seconds


def prepare_rate(src: str, reads_in_flight: int, n: int) -> float:
    """Images/s of the prepare stage alone (list, read, decode, crop), no model."""
    prep = get_spec("efficientnet_lite0").preprocessing
    t0 = time.perf_counter()
    with beam.Pipeline(options=beam_options([])) as p:
        out = (p | ListImages(src)
               | beam.ParDo(PrepareImages(prep, DEFAULT_MAX_PIXELS,
                                          max_in_flight=reads_in_flight))
               .with_outputs(ERRORS, main="images"))
        _ = (out.images | beam.combiners.Count.Globally()
             | beam.Map(lambda c: c == n or _fail(f"{c} of {n} images prepared")))
    return n / (time.perf_counter() - t0)


def _fail(message: str):
    raise RuntimeError(message)


def _table(title: str, rates: dict[str, dict[str, float]], names: list[str]) -> list[str]:
    lines = [title, "", "| reads | " + " | ".join(names) + " | store / local |",
             "|---|---|---|---|"]
    for setting, r in rates.items():
        local, slow = r[names[0]], r[names[1]]
        lines.append(f"| {setting} | {local:.1f} | {slow:.1f} | {slow / local:.2f} |")
    return lines + [""]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--delay-ms", type=float, default=50.0)
    p.add_argument("--reads-in-flight", type=int, default=16, help="the concurrent setting")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--out", default="bench-out/read_latency")
    args = p.parse_args(argv)

    fsspec.config.conf[PROTOCOL] = {"delay_s": args.delay_ms / 1000}
    store = make_store(os.path.abspath(os.path.join(args.out, "store")), args.images)
    sources = {"local": store, f"store {args.delay_ms:g} ms": f"{PROTOCOL}://{store}"}
    settings = {"before (1 in flight)": 1, f"after ({args.reads_in_flight} in flight)":
                args.reads_in_flight}
    embed_rate(store, os.path.join(args.out, "warmup"), 1, args.images, args.batch_size)
    rates: dict[str, dict[str, dict[str, float]]] = {
        what: {s: {} for s in settings} for what in ("embed", "prepare")}
    for _ in range(args.reps):
        for setting, k in settings.items():
            for name, src in sources.items():
                r = {"embed": embed_rate(src, os.path.join(args.out, "features"), k,
                                         args.images, args.batch_size),
                     "prepare": prepare_rate(src, k, args.images)}
                for what, rate in r.items():
                    best = rates[what][setting]
                    best[name] = max(rate, best.get(name, 0.0))
    names = list(sources)
    lines = _table(f"`dn2 embed` of {args.images} images (batch {args.batch_size}, "
                   f"best of {args.reps}), images/s:", rates["embed"], names)
    lines += _table("prepare stage alone (list, read, decode, crop; no model), images/s:",
                    rates["prepare"], names)
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    return rates


if __name__ == "__main__":
    main()
