"""Builds the quickstart's small real image store from Debian's Fashion-MNIST.

OUTPUT/normal/       NORMAL PNGs of one class (the normal set)
OUTPUT/incoming/     the first INCOMING test images, all classes mixed
OUTPUT/incoming.csv  manifest: uri, label (1 = not the normal class), class
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from benchmarks.datasets import (
    FASHION_MNIST_CLASSES,
    load_fashion_mnist,
    write_manifest,
    write_png_store,
)


def build(output: str, *, normal_class: int, normal: int, incoming: int) -> None:
    xtr, ytr = load_fashion_mnist(split="train")
    xte, yte = load_fashion_mnist(split="test")
    idx = np.flatnonzero(ytr == normal_class)[:normal]
    write_png_store(xtr[idx], [f"train-{i:05d}" for i in idx], f"{output}/normal")
    names = [f"test-{i:05d}" for i in range(incoming)]
    uris = write_png_store(xte[:incoming], names, f"{output}/incoming")
    write_manifest([{"uri": f"incoming/{n}.png", "label": int(y != normal_class),
                     "class": FASHION_MNIST_CLASSES[y]}
                    for n, y in zip(names, yte[:incoming], strict=True)],
                   f"{output}/incoming.csv")
    print(f"wrote {len(idx)} normal ({FASHION_MNIST_CLASSES[normal_class]}) and "
          f"{len(uris)} incoming images under {output}")


def run(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--normal-class", type=int, default=7, help="default 7 (Sneaker)")
    p.add_argument("--normal", type=int, default=300)
    p.add_argument("--incoming", type=int, default=300)
    args = p.parse_args(argv)
    build(args.output, normal_class=args.normal_class, normal=args.normal,
          incoming=args.incoming)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
