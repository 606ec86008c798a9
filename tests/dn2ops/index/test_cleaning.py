"""dn2ops.index.cleaning: the auto rule on seeded data with planted impurities, against a
brute-force numpy version of it; the sample against the exact rule; the fraction rule as
before; what a build records (manifest "cleaning", normal.parquet clean_score)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dn2ops.config import CLEAN_AUTO_MIN_ROWS, IndexConfig, cleaning_k
from dn2ops.index import build_index, build_index_from_arrays, cleaning
from dn2ops.index.add import add_to_index
from pipelines.cli import main
from tests.conftest import META, brute_dists, brute_loo_scores, clustered, write_features


def planted(n: int, rate: float, d: int = 32, seed: int = 0, size: int = 20
            ) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian bulk (n, d) with a share ``rate`` of rows replaced by small far clusters of
    about ``size`` impurities each (fewer than k_c: the rule's premise); returns (X float32,
    impure (n,) bool)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    impure = np.zeros(n, bool)
    idx = rng.choice(n, round(rate * n), replace=False)
    impure[idx] = True
    for part in np.array_split(idx, max(1, len(idx) // size)):
        centre = rng.normal(size=d)
        centre *= 2 * np.sqrt(d) / np.linalg.norm(centre)  # twice the bulk's radius out
        X[part] = centre + 0.5 * rng.normal(size=(len(part), d))
    return X.astype(np.float32), impure


def auto_by_hand(X: np.ndarray, k: int, z: float = 3.0, ratio: float = 0.25,
                 rounds: int = 20) -> tuple:
    """The exact auto rule in numpy float64, from every pairwise distance: (kept (n,),
    scores (n,)). s = log mean distance to the k nearest other kept rows; drop s - median >
    min(z x 1.4826 MAD, ratio) (median, MAD of the kept rows' s); until nothing changes."""
    X = X.astype(np.float64)
    D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    n = len(X)
    kept = np.ones(n, bool)
    for r in range(rounds):
        s = np.log(np.sort(D[:, kept], axis=1)[:, :k].mean(axis=1))
        med = np.median(s[kept])
        scale = 1.4826 * np.median(np.abs(s[kept] - med))
        new = s <= med + min(z * scale, ratio)
        most = min(n // 2, n - k - 1)
        if (~new).sum() > most:
            new = np.ones(n, bool)
            new[np.argsort(-s, kind="stable")[:most]] = False
        if (new == kept).all() or r == rounds - 1:
            return new, s
        kept = new
    raise AssertionError


def rows_of(X: np.ndarray, block: int = 97):
    return lambda kept=None: iter([X[a:a + block] for a in range(0, len(X), block)])


def auto(X: np.ndarray, sample: int | None = None, min_keep: int = 3) -> cleaning.Cleaned:
    config = IndexConfig(clean_fraction="auto", clean_sample=sample)
    return cleaning.auto(rows_of(X), len(X), config, min_keep)


@pytest.mark.parametrize("rate", [0.05, 0.10])
def test_auto_removes_planted_impurities_and_few_normal_rows(rate):
    X, impure = planted(2000, rate)
    got = auto(X)
    removed = ~got.kept
    assert (removed & impure).sum() >= 0.95 * impure.sum()
    assert (removed & ~impure).sum() <= 0.01 * (~impure).sum()
    assert got.entry["rule"] == "auto"
    assert got.entry["estimated_rate"] == pytest.approx(rate, abs=0.01)
    assert got.entry["removed"] == removed.sum() and got.entry["of"] == 2000
    assert got.entry["k_c"] == 100 and got.entry["sample"] is None  # exact at n <= 10,000


# Not below ~16 dimensions: there a clean Gaussian's log scores spread so wide that the
# 0.25 cap above the median binds and the rounds peel its shell (measured, 3000 rows: d=16
# 59 removed, d=8 424, d=4 1425); CNN features (and set embeddings) are far wider.
@pytest.mark.parametrize("d", [32, 64])
def test_auto_removes_at_most_two_percent_of_a_clean_set(d):
    X = np.random.default_rng(d).normal(size=(3000, d)).astype(np.float32)
    assert (~auto(X).kept).sum() <= 0.02 * len(X)
    blob = (5 + 1e-3 * np.random.default_rng(1).normal(size=(2000, 64))).astype(np.float32)
    assert (~auto(blob).kept).sum() <= 0.02 * len(blob)  # a tight clean blob


def test_exact_auto_rule_equals_numpy_by_hand():
    X, _ = planted(400, 0.05, d=8, seed=4)
    got = auto(X)
    kept, s = auto_by_hand(X, cleaning.auto_k(400))
    np.testing.assert_array_equal(got.kept, kept)
    np.testing.assert_allclose(got.scores, s, rtol=1e-4, atol=1e-4)
    assert got.entry["removed"] == (~kept).sum() > 0
    # Here (8-d) the 0.25 cap binds (3 MAD is wider), over several rounds.
    e = got.entry
    assert e["threshold"] == pytest.approx(e["median"] + 0.25) and 3 * e["scale"] > 0.25
    assert e["rounds"] > 2 and e["converged"] and e["ratio"] == 0.25


def test_auto_neighbourhood_is_five_percent_of_n_at_any_size():
    assert [cleaning.auto_k(n) for n in (50, 400, 6000, 200_000, 1_000_000)] == [
        10, 20, 300, 10_000, 50_000]  # no upper cap
    # Against the default sample of 5,000: 5 % of it, whatever n.
    assert cleaning.sample_k(cleaning.auto_k(200_000), 5000, 200_000) == 250
    assert cleaning.sample_k(cleaning.auto_k(1_000_000), 5000, 1_000_000) == 250


def test_sample_of_every_row_is_the_exact_rule():
    X, _ = planted(600, 0.10, seed=5)
    exact, whole = auto(X, sample=None), auto(X, sample=600)
    np.testing.assert_array_equal(exact.kept, whole.kept)
    np.testing.assert_array_equal(exact.scores, whole.scores)
    assert whole.entry["sample"] is None


@pytest.mark.parametrize("rate", [0.05, 0.10])
def test_a_smaller_sample_removes_nearly_the_same_rows(rate):
    X, impure = planted(6000, rate, seed=6)
    exact, sampled = ~auto(X).kept, auto(X, sample=1000)
    got = ~sampled.kept
    overlap = (exact & got).sum() / (exact | got).sum()  # measured: 0.95-1.0
    assert overlap >= 0.9
    assert (got & impure).sum() >= 0.9 * impure.sum()
    assert sampled.entry["sample"] == 1000
    assert sampled.entry["k_s"] == cleaning.sample_k(cleaning.auto_k(6000), 1000, 6000) == 50


def test_auto_never_removes_more_than_half_nor_below_min_keep():
    X, _ = planted(200, 0.0, d=4, seed=7)
    X[:150] += 50 * np.random.default_rng(8).normal(size=(150, 4)).astype(np.float32)
    assert (~auto(X).kept).sum() <= 100
    assert auto(X, min_keep=190).kept.sum() >= 190


def test_auto_is_not_applied_to_a_few_rows():
    got = auto(clustered(CLEAN_AUTO_MIN_ROWS - 1))
    assert got.kept.all() and np.isnan(got.scores).all()
    assert got.entry["rule"] == "not applied" and got.entry["asked"] == "auto"
    assert f"at least {CLEAN_AUTO_MIN_ROWS} " in got.entry["why"]
    assert CLEAN_AUTO_MIN_ROWS == 50


def test_robust_scale_falls_back_when_most_scores_are_equal():
    s = np.array([1.0] * 6 + [2.0, 3.0, 40.0])
    centre, scale = cleaning.robust_centre_scale(s)
    assert centre == 1.0 and scale == pytest.approx(1.2533 * (1 + 2 + 39) / 9)
    assert cleaning.robust_centre_scale(np.ones(5)) == (1.0, 0.0)
    assert cleaning.fit_sample(np.ones((30, 3), np.float32), 3).kept.all()  # no spread


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    X, impure = planted(500, 0.06, d=32, seed=9, size=10)
    write_features(root / "feats", X, [200, 0, 300])
    return root, X, impure


def normal_table(index_dir):
    return pq.read_table(f"{index_dir}/normal.parquet")


def test_build_records_the_auto_rule_and_every_rows_score(dirty, tmp_path):
    root, X, impure = dirty
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(clean_fraction="auto", shards=2))
    t = normal_table(tmp_path / "i")
    kept_by_hand, s = auto_by_hand(X, cleaning.auto_k(500))
    np.testing.assert_array_equal(t.column("kept").to_numpy(), kept_by_hand)
    np.testing.assert_allclose(t.column("clean_score").to_numpy(), s, rtol=1e-4, atol=1e-4)
    c = m["cleaning"]
    assert {key: c[key] for key in ("rule", "removed", "of", "sample", "k_c", "z")} == {
        "rule": "auto", "removed": int((~kept_by_hand).sum()), "of": 500, "sample": None,
        "k_c": 25, "z": 3.0}
    assert c["removed"] == m["counts"]["dropped"] and c["estimated_rate"] == c["removed"] / 500
    assert (t.column("clean_score").to_numpy()[~kept_by_hand] > c["threshold"]).all()
    # Here (32-d) 3 MAD is narrower than the 0.25 cap: it sets the threshold.
    assert c["threshold"] == pytest.approx(c["median"] + 3 * c["scale"])
    assert 3 * c["scale"] < 0.25
    assert (~kept_by_hand & impure).sum() >= 0.95 * impure.sum()
    assert m["clean_fraction"] == "auto" and m["clean_k"] is None  # the old keys, as they were
    # The index holds the kept rows only.
    assert m["counts"] == {"normal_in": 500, "kept": int(kept_by_hand.sum()),
                           "dropped": c["removed"]}


def test_build_records_the_fraction_rule_and_its_scores(dirty, tmp_path):
    root, X, _ = dirty
    m = build_index(str(root / "feats"), str(tmp_path / "i"),
                    IndexConfig(clean_fraction=0.05, clean_k=10))
    scores = normal_table(tmp_path / "i").column("clean_score").to_numpy()
    np.testing.assert_allclose(scores, brute_loo_scores(X, 10), rtol=1e-5)
    assert m["cleaning"] == {"rule": "fraction", "estimated_rate": None, "removed": 25,
                             "of": 500, "threshold": pytest.approx(np.sort(scores)[-25]),
                             "sample": None, "rounds": 1, "fraction": 0.05, "clean_k": 10}
    assert m["clean_fraction"] == 0.05 and m["clean_k"] == cleaning_k(2, 10, 500) == 10


def test_build_without_cleaning_records_off(dirty, tmp_path):
    root, _, _ = dirty
    m = build_index(str(root / "feats"), str(tmp_path / "i"))  # the library default
    assert m["cleaning"]["rule"] == "off" and m["cleaning"]["removed"] == 0
    assert np.isnan(normal_table(tmp_path / "i").column("clean_score").to_numpy()).all()


@pytest.mark.parametrize("flags, rule", [([], "auto"), (["--no-clean"], "off"),
                                         (["--clean-fraction", "0"], "off"),
                                         (["--clean-fraction", "0.04"], "fraction")])
def test_cli_build_cleans_by_default(dirty, tmp_path, flags, rule):
    root, _, impure = dirty
    assert main(["build-index", "--features", str(root / "feats"), "--output",
                 str(tmp_path / "i"), "--device", "cpu", "--feature-transform", "none",
                 *flags]) == 0
    m = json.loads((tmp_path / "i" / "_SUCCESS").read_text())
    assert m["cleaning"]["rule"] == rule
    removed = ~normal_table(tmp_path / "i").column("kept").to_numpy()
    assert removed.sum() == {"auto": m["cleaning"]["removed"], "off": 0, "fraction": 20}[rule]
    if rule == "auto":
        assert (removed & impure).sum() >= 0.9 * impure.sum()


def test_an_index_of_few_sets_says_why_it_was_not_cleaned(tmp_path):
    m = build_index_from_arrays([f"s{i}" for i in range(6)], [f"h{i}" for i in range(6)],
                                clustered(6), META, str(tmp_path / "g"),
                                IndexConfig(clean_fraction="auto"))
    assert m["cleaning"]["rule"] == "not applied" and m["counts"]["dropped"] == 0
    assert "6 normal rows" in m["cleaning"]["why"]


def test_scores_against_a_sample_by_hand():
    """The scores against a sample: the k nearest sample rows, by hand."""
    X, _ = planted(300, 0.0, d=6, seed=10)
    sample = X[::3]
    got = cleaning.score_rows(iter([X[:100], X[100:]]), sample, 4)
    want = np.log(np.sort(brute_dists(X, sample), axis=1)[:, :4].mean(axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def grown(dirty, tmp_path_factory):
    """added/: 60 rows of the bulk and a far cluster of 10 impurities (rows 50..59)."""
    root, X, _ = dirty
    rng = np.random.default_rng(12)
    A = rng.normal(size=(60, 32)).astype(np.float32)
    A[50:] = 8 + 0.5 * rng.normal(size=(10, 32))
    write_features(root / "added", A, [30, 30], start=1000)
    return root, A


@pytest.mark.parametrize("hnsw_m", [None, 8])  # flat: the parent's shards; HNSW: its features
def test_add_removes_added_rows_above_the_parents_threshold(dirty, grown, tmp_path, hnsw_m):
    root, A = grown
    parent = build_index(str(root / "feats"), str(tmp_path / "p"),
                         IndexConfig(clean_fraction="auto", hnsw_m=hnsw_m))
    m = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"))
    t = normal_table(tmp_path / "a")
    added = {key: m["cleaning"]["added"][key] for key in ("rule", "removed", "of", "threshold")}
    assert added == {"rule": "auto", "removed": 10, "of": 60,
                     "threshold": parent["cleaning"]["threshold"]}
    kept = t.column("kept").to_numpy()[500:]
    np.testing.assert_array_equal(kept, np.arange(60) < 50)
    assert (t.column("id").to_numpy()[500:][~kept] == -1).all()
    # Each added row's score: against every kept parent row (the parent was exact), by hand.
    xb = dirty[1][normal_table(tmp_path / "p").column("kept").to_numpy()]
    k_s = m["cleaning"]["added"]["k_s"]
    want = np.log(np.sort(brute_dists(A, xb), axis=1)[:, :k_s].mean(axis=1))
    np.testing.assert_allclose(t.column("clean_score").to_numpy()[500:], want, rtol=1e-4)
    assert m["counts"] == {"normal_in": 560, "kept": parent["counts"]["kept"] + 50,
                           "dropped": parent["counts"]["dropped"] + 10}
    assert m["added"]["images"] == 50
    assert m["cleaning"]["rule"] == "auto" and m["cleaning"]["removed"] == \
        parent["cleaning"]["removed"]  # the build's own record, kept as it was


@pytest.mark.parametrize("config, clean, rule", [
    (IndexConfig(clean_fraction="auto"), False, "off"),
    (IndexConfig(), True, "off"),
    (IndexConfig(clean_fraction=0.02), True, "not applied")])
def test_add_says_why_it_did_not_clean(dirty, grown, tmp_path, caplog, config, clean, rule):
    root, _ = grown
    build_index(str(root / "feats"), str(tmp_path / "p"), config)
    m = add_to_index(str(root / "added"), str(tmp_path / "p"), str(tmp_path / "a"), clean=clean)
    assert m["cleaning"]["added"]["rule"] == rule and m["cleaning"]["added"]["removed"] == 0
    assert m["cleaning"]["added"]["why"]
    assert normal_table(tmp_path / "a").column("kept").to_numpy()[-60:].all()
    warned = [r for r in caplog.records if "not cleaned" in r.getMessage()]
    assert len(warned) == (rule == "not applied")


def test_cli_add_takes_no_clean_and_refuses_a_fraction(dirty, grown, tmp_path, capsys):
    root, _ = grown
    assert main(["build-index", "--features", str(root / "feats"), "--output",
                 str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert main(["build-index", "--add", str(root / "added"), "--index", str(tmp_path / "p"),
                 "--output", str(tmp_path / "a"), "--device", "cpu", "--no-clean"]) == 0
    m = json.loads((tmp_path / "a" / "_SUCCESS").read_text())
    assert m["cleaning"]["added"]["rule"] == "off" and "--no-clean" in m["cleaning"]["added"][
        "why"]
    with pytest.raises(SystemExit):
        main(["build-index", "--add", str(root / "added"), "--index", str(tmp_path / "p"),
              "--output", str(tmp_path / "b"), "--clean-fraction", "0.1"])
    assert "--clean-fraction 0.1 would remove a share" in capsys.readouterr().err


def test_a_ratio_caps_the_threshold_above_the_median():
    X, _ = planted(400, 0.0, d=8, seed=13)
    free, capped = cleaning.fit_sample(X, 20), cleaning.fit_sample(X, 20, ratio=0.01)
    assert capped.threshold == pytest.approx(capped.centre + 0.01)
    assert (~capped.kept).sum() > (~free.kept).sum()
    same = cleaning.fit_sample(np.ones((30, 3), np.float32), 3, ratio=0.1)
    assert same.threshold == pytest.approx(same.centre + 0.1)  # no spread: the ratio alone
