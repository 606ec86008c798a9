"""Choosing what the report shows, checked against hand counts and brute force."""

import itertools

import numpy as np
import pyarrow as pa
import pytest

from dn2ops.report import content, label_is_anomalous


def _table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    ranks = (-scores).argsort().argsort() + 1
    return pa.table({"uri": [f"u{i}" for i in range(n)], "score": scores, "rank": ranks})


def _pairwise_auc(labels, scores) -> float:
    """P(score of an anomalous > score of a normal), ties count half: the AUC by definition."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y]
    neg = [s for y, s in zip(labels, scores, strict=True) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, True), (0, False), (True, True), (False, False), (np.int64(1), True),
        (1.0, True), ("anomaly", True), ("Anomalous", True), ("normal", False),
        ("1", True), ("0", False), (None, None), (2, None), (float("nan"), None),
        ("unsure", None), ("<script>", None),
    ],
)
def test_label_is_anomalous(value, expected):
    assert label_is_anomalous(value) is expected


def test_top_rows_by_rank_and_a_sample_of_the_rest():
    table = _table(50)
    top, sample = content.select_rows(table, 5, 10)
    assert [r["rank"] for r in top] == [1, 2, 3, 4, 5]
    assert len(sample) == 10 and min(r["rank"] for r in sample) > 5
    assert [r["rank"] for r in sample] == sorted(r["rank"] for r in sample)
    assert content.select_rows(table, 100, 10) == (table.sort_by("rank").to_pylist(), [])
    assert content.select_rows(table.slice(0, 0), 5, 5) == ([], [])


def test_flagged_rows_first_then_by_rank_and_unflagged_results_by_rank():
    table = _table(30)
    flagged = pa.array([r in (4, 9) for r in table["rank"].to_pylist()])
    top, sample = content.select_rows(table.append_column("flagged", flagged), 4, 30)
    assert [r["rank"] for r in top] == [4, 9, 1, 2]
    assert [r["rank"] for r in sample] == [n for n in range(3, 31) if n not in (4, 9)]
    unknown = table.append_column("flagged", pa.nulls(30, pa.bool_()))  # results before flags
    assert [r["rank"] for r in content.select_rows(unknown, 3, 0)[0]] == [1, 2, 3]


@pytest.mark.parametrize("flags, sentence", [
    ({"rule": "fdr", "level": 0.05, "flagged": 3, "threshold": 1.23456},
     "Flagged: Benjamini–Hochberg at 5 %: among flagged images, at most 5 % are expected to "
     "be normal ones; 3 flagged (scores >= 1.235)."),
    ({"rule": "alpha", "level": 0.001, "flagged": 0, "threshold": None},
     "Flagged: p-value <= 0.001: a normal image is flagged with chance 0.1 %; 0 flagged."),
    ({"rule": None, "why": "covtrace has no normal sets"},
     "Nothing is flagged: covtrace has no normal sets."),
])
def test_flag_sentence_says_what_the_flag_means(flags, sentence):
    assert content.flag_sentence({"flags": flags}) == sentence
    assert content.flag_sentence({}) is None and content.flag_sentence(None) is None


def test_sample_does_not_depend_on_row_order():
    table = _table(200)
    shuffled = table.take(np.random.default_rng(1).permutation(200))
    assert content.select_rows(table, 3, 20) == content.select_rows(shuffled, 3, 20)


def test_uris_to_show_once_each_in_first_use_order():
    top = [{"uri": "a", "neighbor_uris": ["n1", "n2"]}, {"uri": "b", "neighbor_uris": ["n1"]}]
    groups = [{"member_uris": ["m1", "a", "m2", "m3", "m4", "m5"]}]
    assert content.uris_to_show(top, [{"uri": "c"}], groups) == [
        "a", "n1", "n2", "b", "c", "m1", "m2", "m3"]


def test_neighbours_pair_uris_with_distances():
    assert content.neighbours({"neighbor_uris": ["x", "y"], "neighbor_distances": [0.5]}) == [
        ("x", 0.5), ("y", None)]
    assert content.neighbours({}) == []


def test_group_view_caps_members_and_neighbours():
    g = {"rank": 1, "group": "g", "score": 2.0, "size": 9, "member_uris": list("abcdefghi"),
         "neighbor_groups": list("pqrstuv")}
    view = content.group_view(g)
    assert view["members"] == list("abcd") and view["more"] == 5
    assert view["neighbours"] == list("pqrst") and view["more_neighbours"]


def test_roc_against_pairwise_count_with_string_and_unknown_labels():
    rng = np.random.default_rng(3)
    truth = rng.random(80) < 0.3
    scores = rng.normal(size=80) + truth
    words = ["anomalous" if y else "normal" for y in truth]
    words[0], words[1] = "unsure", None
    scores[2] = np.nan  # no usable score: left out
    roc = content.roc(pa.table({"score": scores, "label": words}), "label")
    keep = np.ones(80, bool)
    keep[:3] = False
    assert roc.n_pos == truth[keep].sum() and roc.n_neg == (~truth[keep]).sum()
    assert roc.n_left_out == 3
    assert roc.auc == pytest.approx(_pairwise_auc(truth[keep], scores[keep]), abs=1e-12)
    assert roc.fpr[0] == 0 and roc.tpr[-1] == 1


def test_roc_with_one_class_is_not_drawn():
    roc = content.roc(pa.table({"score": [0.1, 0.2], "label": [0, 0]}), "label")
    assert (roc.n_pos, roc.n_neg, roc.auc) == (0, 2, None)


def test_errors_capped_sorted_and_counted_by_reason():
    n = content.MAX_ERROR_ROWS + 20
    errors = pa.table({"uri": [f"u{i:04d}" for i in range(n)][::-1],
                       "stage": ["read", "decode"] * (n // 2), "error": ["e1", "e2"] * (n // 2)})
    rows = content.error_rows(errors)
    assert len(rows) == content.MAX_ERROR_ROWS
    assert [r["stage"] for r in rows[:2]] == ["decode", "decode"]
    assert rows[0]["uri"] < rows[1]["uri"]
    assert content.error_reasons(errors) == ([("decode", "e2", n // 2), ("read", "e1", n // 2)], 0)
