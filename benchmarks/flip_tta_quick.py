"""Flip TTA on Fashion-MNIST's quick protocol, from benchmarks/accuracy.py's cached features.

The quick protocol (first 500 normal images per class, first 2000 test images) needs
only 7000 mirrored images, where the full one needs 70000: they are embedded here by
benchmarks/array_features.py (not cached), and each image's feature is the mean of its
own (the cache's) and its mirror's. Prints the mean and per-class ROC-AUC, k=2, of the
raw and sqrt-l2 features, plain and flip-averaged.

    python benchmarks/flip_tta_quick.py --cache CACHE   # CACHE of accuracy.py embed
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

from benchmarks import accuracy as acc  # noqa: E402
from benchmarks import array_features  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=acc.DEFAULT_CACHE)
    args = p.parse_args(argv)
    ds = acc.fashion_mnist()
    prot = acc.select(ds, 500, 2000)
    plain = acc.load_split(args.cache, "fmnist", "efficientnet_lite0")
    rows = np.concatenate([prot.train_idx[c] for c in prot.train_idx])
    flip_train, facts = array_features.embed(acc._flip(ds.train_images[rows]),
                                             "efficientnet_lite0")
    flip_test, _ = array_features.embed(acc._flip(ds.test_images[prot.test_idx]),
                                        "efficientnet_lite0")
    print("mirrored training images:", facts)
    at = {int(i): j for j, i in enumerate(rows)}
    for name in ("none", "sqrt-l2"):
        for tta in (False, True):
            aucs = []
            for c, idx in prot.train_idx.items():
                train, test = plain.train[idx], plain.test[prot.test_idx]
                if tta:
                    train = (train + flip_train[[at[int(i)] for i in idx]]) / 2
                    test = (test + flip_test) / 2
                scores = acc.knn_scores(acc._t(train, name), acc._t(test, name), 2)
                aucs.append(acc.auc(prot.test_labels, c, scores))
            print(f"{name}, {'flip TTA' if tta else 'plain'}: {np.mean(aucs):.4f}",
                  [round(a, 4) for a in aucs])


if __name__ == "__main__":
    main()
