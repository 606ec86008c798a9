"""Pooled features from more than one stage of EfficientNet-Lite0, on the quick protocols.

Every image of Fashion-MNIST's quick protocol (first 500 normal images per class,
first 2000 test images) and of the digits protocol (benchmarks/accuracy.py) goes
through dn2's crop and Lite0 in torch once, keeping the globally average-pooled output
of the last three stages (112, 192 and 320 channels, before the 1x1 head) beside the
1280-d feature dn2 uses. Treatments, each k=2 kNN, ROC-AUC per class:

  final        the 1280-d feature, sqrt-l2 (dn2's default)
  +s7          sqrt-l2 of the final feature, concatenated with the sqrt-l2 of stage 7's
               pooled output (320), each part unit length, so each weighs alike
  +s6+s7       ... and stage 6's (192)
  +s5+s6+s7    ... and stage 5's (112)

The extra stages cost nothing to compute (the same forward pass) and add 320 to 624
dimensions to search. Prints one line per treatment and dataset, and the seconds the
embedding took.

    python benchmarks/stage_pooling_quick.py [--datasets fmnist,digits]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

import torch  # noqa: E402  (before faiss)
from torch.nn import functional as F  # noqa: E402

from benchmarks import accuracy as acc  # noqa: E402
from benchmarks.array_features import crops  # noqa: E402
from dn2ops.embed.backbones import get_spec, load_backbone  # noqa: E402

BACKBONE = "efficientnet_lite0"
# The last block of stages 5, 6 and 7 of Lite0 (16 blocks: 1, 2, 2, 3, 3, 4, 1).
STAGE_ENDS = {"s5": 10, "s6": 14, "s7": 15}
TREATMENTS = {"final": (), "+s7": ("s7",), "+s6+s7": ("s6", "s7"),
              "+s5+s6+s7": ("s5", "s6", "s7")}


def pooled_stages(images: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """Grey uint8 images (n, H, W) -> {"final": (n, 1280), "s5": (n, 112), ...}."""
    model = load_backbone(BACKBONE, None).eval()
    prep = get_spec(BACKBONE).preprocessing
    out: dict[str, list[np.ndarray]] = {name: [] for name in ("final", *STAGE_ENDS)}
    with torch.inference_mode():
        for at in range(0, len(images), batch):
            x = prep.normalize(torch.from_numpy(np.stack(crops(images[at:at + batch],
                                                               BACKBONE))))
            x = F.relu6(model._bn0(model._conv_stem(x)))
            for i, block in enumerate(model._blocks):
                x = block(x)
                for name, end in STAGE_ENDS.items():
                    if i == end:
                        out[name].append(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1).numpy())
            x = F.relu6(model._bn1(model._conv_head(x)))
            out["final"].append(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1).numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def treatment(feats: dict[str, np.ndarray], parts: tuple[str, ...], rows) -> np.ndarray:
    """sqrt-l2 of the final feature, concatenated with the sqrt-l2 of each stage in parts."""
    return np.concatenate([acc._t(feats[p][rows], "sqrt-l2") for p in ("final", *parts)],
                          axis=1)


def run(name: str, train_per_class: int | None, test: int | None) -> dict[str, float]:
    ds = acc.DATASETS[name]()
    prot = acc.select(ds, train_per_class, test)
    rows = np.concatenate([prot.train_idx[c] for c in prot.train_idx])
    t0 = time.perf_counter()
    train = pooled_stages(ds.train_images[rows])
    tests = pooled_stages(ds.test_images[prot.test_idx])
    seconds = time.perf_counter() - t0
    at = {int(i): j for j, i in enumerate(rows)}
    means = {}
    for label, parts in TREATMENTS.items():
        aucs = []
        for c, idx in prot.train_idx.items():
            xb = treatment(train, parts, [at[int(i)] for i in idx])
            xq = treatment(tests, parts, slice(None))
            aucs.append(acc.auc(prot.test_labels, c, acc.knn_scores(xb, xq, 2)))
        means[label] = float(np.mean(aucs))
        print(f"{name} {label:>10}: {means[label]:.4f}", [round(a, 4) for a in aucs],
              flush=True)
    print(f"{name}: {len(rows) + len(prot.test_idx)} images embedded (torch) in "
          f"{seconds:.0f} s", flush=True)
    return means


def main(argv=None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="fmnist,digits")
    args = p.parse_args(argv)
    protocols = {"fmnist": (500, 2000), "digits": (None, None)}
    return {d: run(d, *protocols[d]) for d in args.datasets.split(",")}


if __name__ == "__main__":
    main()
