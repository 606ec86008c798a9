"""benchmarks/contamination.py's fixed shares and their label-chosen best, by hand."""

from __future__ import annotations

import numpy as np

from benchmarks.contamination import best_share, kept_mean, rule_named


def test_fixed_share_of_any_size_drops_the_rows_farthest_from_their_neighbourhood():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (95, 4)), rng.normal(0, 1, (5, 4)) + 30]
                       ).astype(np.float32)
    kept = rule_named("fixed-5%")(X, 2)
    assert kept.sum() == 95 and not kept[95:].any()  # the 5 far rows, and only they
    kept = rule_named("fixed-12.5%")(X, 2)
    s = kept_mean(X, np.ones(100, bool), 10)  # 5 % of n, at least 10: the rule's own
    assert kept.sum() == 88 and set(np.flatnonzero(~kept)) == set(np.argsort(-s)[:12])


def test_best_share_takes_each_classes_best_auc():
    got = best_share({"none": [0.9, 0.5, 0.7], "fixed-5%": [0.8, 0.6, 0.7],
                      "fixed-10%": [0.7, 0.65, 0.6]})
    assert got == {"auc": round((0.9 + 0.65 + 0.7) / 3, 4),
                   "of": ["none", "fixed-5%", "fixed-10%"],
                   "best": ["none", "fixed-10%", "none"]}
