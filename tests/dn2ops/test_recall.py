"""dn2ops.recall: recall@k by hand, and the effort tuning's choice."""

from __future__ import annotations

import numpy as np

from dn2ops.recall import recall_at_k, tune


def test_recall_counts_the_exact_ids_found_in_any_order():
    exact = np.array([[1, 2], [3, 4], [5, 6]])
    approx = np.array([[2, 1], [3, 9], [7, 8]])
    assert recall_at_k(approx, exact) == 3 / 6
    assert recall_at_k(exact, exact) == 1.0


def test_tune_stops_at_the_first_effort_reaching_the_target():
    exact = np.array([[0, 1], [2, 3]])
    found = {1: [[0, 9], [9, 9]], 2: [[0, 1], [2, 9]], 4: [[0, 1], [2, 3]], 8: [[0, 1], [2, 3]]}
    asked = []

    def ids_at(e):
        asked.append(e)
        return np.array(found[e])

    chosen, curve = tune(ids_at, exact, [1, 2, 4, 8], target=0.75)
    assert chosen == 2 and curve == {1: 0.25, 2: 0.75} and asked == [1, 2]
    chosen, curve = tune(ids_at, exact, [1, 2], target=0.99)  # never reached: the largest
    assert chosen == 2 and curve == {1: 0.25, 2: 0.75}
    asked.clear()
    chosen, curve = tune(ids_at, exact, [1, 2, 4, 8], target=0.99, fixed=4)
    assert (chosen, curve, asked) == (4, {4: 1.0}, [4])
