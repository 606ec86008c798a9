"""dn2ops.index.calibration: conformal p-values against a normal reference, by hand and by
brute force, their validity on exchangeable data, the fitted tail, and the reference as
an index records it (built now, and built before the tail and removed rows were recorded).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from dn2ops.config import IndexConfig
from dn2ops.index import IndexError_, LoadedIndex, build_index
from dn2ops.index.calibration import (
    MIN_EXCEED,
    Reference,
    fit_tail,
    load_reference,
    p_values,
    rank_floor,
    tail_entry,
    tail_of,
)
from tests.conftest import brute_scores, clustered, write_features

LEVELS = (0.01, 0.05, 0.1)


def test_rank_p_values_by_hand():
    ref = Reference.of(np.array([4.0, 2.0, 1.0, 2.0]))  # n = 4, a tie at 2
    assert ref.tail is None and ref.n == 4 and ref.floor == pytest.approx(1 / 5)
    p, source = ref.p_values(np.array([0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]))
    # (1 + #{reference >= s}) / (n + 1)
    np.testing.assert_allclose(p, [5 / 5, 5 / 5, 4 / 5, 4 / 5, 2 / 5, 2 / 5, 1 / 5])
    assert source.tolist() == ["rank"] * 7
    np.testing.assert_allclose(ref.percentile(np.array([1.0, 2.0, 5.0])), [0, 25, 100])


def test_rank_p_values_equal_brute_force():
    rng = np.random.default_rng(0)
    ref = np.round(rng.gamma(2.0, 1.0, 300), 2)  # ties
    s = np.concatenate([np.round(rng.gamma(2.0, 1.0, 500), 2), ref[:50], [ref.max() + 1]])
    p, used = p_values(s, np.sort(ref))
    brute = (1 + (ref[None, :] >= s[:, None]).sum(axis=1)) / (len(ref) + 1)
    np.testing.assert_array_equal(p, brute)
    assert not used.any()


def test_percentile_and_p_value_agree():
    rng = np.random.default_rng(1)
    ref = Reference.of(rng.lognormal(0, 0.5, 1000))
    s = rng.lognormal(0, 0.5, 200)
    p, source = ref.p_values(s)
    rank = source == "rank"
    n = ref.n
    below = ref.percentile(s) * n / 100  # #{reference < s}
    np.testing.assert_allclose(p[rank], (1 + n - below[rank]) / (n + 1))


def test_a_tail_needs_enough_exceedances():
    rng = np.random.default_rng(2)
    assert fit_tail(rng.lognormal(size=39)) is None  # 39 // 2 = 19 < MIN_EXCEED
    tail = fit_tail(rng.lognormal(size=40))
    assert tail is not None and tail.n_exceed == MIN_EXCEED == 20 and tail.n == 40
    assert fit_tail(np.ones(1000)) is None  # no excess over the threshold
    ref = Reference.of(np.append(rng.lognormal(size=100), [np.nan, np.nan]))
    assert ref.n == 100 and ref.tail == fit_tail(ref.scores)  # NaN: not reference scores


def test_the_tail_goes_below_the_floor_never_rises_and_meets_the_rank_at_the_switch():
    rng = np.random.default_rng(3)
    ref = Reference.of(rng.lognormal(0, 0.5, 5000))
    tail, n = ref.tail, ref.n
    assert tail is not None and tail.n_exceed == 250 and tail.switch == 10
    assert ref.floor == 0.0  # a tail extrapolates without bound
    far = ref.scores[-1] + np.array([0.1, 1.0, 3.0])
    p, source = ref.p_values(far)
    assert (source == "tail").all() and (p < rank_floor(n)).all()
    grid = np.linspace(0, 3 * ref.scores[-1], 20001)
    p, source = ref.p_values(np.concatenate([grid, ref.scores]))
    order = np.argsort(np.concatenate([grid, ref.scores]), kind="stable")
    assert (np.diff(p[order]) <= 0).all()  # p never rises with the score
    # The tail takes over where fewer than `switch` reference scores reach the score:
    # at the switch-th largest score p is the rank's, just above it the tail's, capped
    # there, and within 0.5x of it (the GPD and the top ranks agree up to noise).
    s_switch = ref.scores[n - tail.switch]
    (p_rank, p_tail), src = ref.p_values(np.array([s_switch, np.nextafter(s_switch, 9)]))
    assert src.tolist() == ["rank", "tail"]
    assert p_rank == pytest.approx((1 + tail.switch) / (n + 1))
    assert 0.5 * p_rank <= p_tail <= p_rank
    # Within the tail p is continuous: a small step in score, a small step in p.
    s = np.linspace(s_switch + 1e-9, ref.scores[-1] * 2, 100001)
    p = ref.p_values(s)[0]
    assert np.abs(np.diff(p)).max() < 1e-3 * p_rank


@pytest.mark.parametrize("alpha", LEVELS)
def test_rank_p_values_are_valid_on_exchangeable_data(alpha):
    """A reference of 5000 and 20000 new scores from one heavy-ish distribution (the
    log-normal): the share with p <= alpha is within the 99.9% interval of its exact law
    under exchangeability, Beta-Binomial(m, l, n + 1 - l) with l = floor(alpha (n + 1))
    (the binomial widened by the reference's own sampling noise)."""
    rng = np.random.default_rng(4)
    n, m = 5000, 20000
    ref = Reference.of(rng.lognormal(0, 0.5, n))
    p, _ = ref.p_values(rng.lognormal(0, 0.5, m))
    level = int(np.floor(alpha * (n + 1)))
    lo, hi = stats.betabinom.ppf([0.0005, 0.9995], m, level, n + 1 - level)
    assert lo <= (p <= alpha).sum() <= hi


def test_tail_p_values_are_valid_beyond_the_rank_resolution():
    """At alpha = 0.001, where rank p-values of 5000 scores are all but exhausted (p <=
    0.001 needs fewer than 5 reference scores above: the tail gives every such p): pooled
    over 40 seeded references with 25000 new scores each, the share flagged is alpha
    within 15% (the pooled binomial's 99.9% interval is +-11%; the fits' own noise,
    measured over seeds, about 6% more)."""
    rng = np.random.default_rng(5)
    flagged = total = 0
    for _ in range(40):
        ref = Reference.of(rng.lognormal(0, 0.5, 5000))
        p, source = ref.p_values(rng.lognormal(0, 0.5, 25000))
        assert (source[p <= 0.001] == "tail").all()
        flagged += int((p <= 0.001).sum())
        total += len(p)
    assert abs(flagged / total / 0.001 - 1) < 0.15


def test_a_tail_round_trips_through_the_manifest():
    tail = fit_tail(np.random.default_rng(6).gamma(2.0, 1.0, 3000))
    assert tail_of(json.loads(json.dumps(tail_entry(tail)))) == tail
    assert tail_entry(None) is None and tail_of(None) is None


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    X = clustered(400, seed=8)
    write_features(root / "feats", X, [250, 150])
    return root / "feats", X


def test_the_reference_loads_from_the_manifest_and_normal_parquet_only(feats, tmp_path):
    features_dir, X = feats
    m = build_index(str(features_dir), str(tmp_path / "i"), IndexConfig(k=2))
    loaded = LoadedIndex(str(tmp_path / "i"), device="cpu")
    for shard in (tmp_path / "i").glob("shard-*"):
        shard.unlink()  # the light loader never reads the shards
    ref = load_reference(str(tmp_path / "i"))
    np.testing.assert_array_equal(ref.scores, loaded.reference.scores)
    np.testing.assert_array_equal(ref.scores, loaded.train_scores)
    assert ref.tail == loaded.reference.tail == tail_of(m["reference"]["tail"])
    assert ref.tail == fit_tail(ref.scores)
    s = np.concatenate([ref.scores[::7], ref.scores[-1] + [0.5, 2.0]])
    p, source = loaded.p_values(s)
    assert p.dtype == np.float64 and p.shape == source.shape == s.shape
    assert source[-2:].tolist() == ["tail", "tail"] and p[-1] < p[-2] < 1 / (ref.n + 1)
    for a, b in zip(ref.p_values(s), (p, source), strict=True):
        np.testing.assert_array_equal(a, b)
    normal = tmp_path / "i" / "normal.parquet"
    normal.write_bytes(normal.read_bytes()[:-10])
    with pytest.raises(IndexError_, match="normal.parquet has sha256"):
        load_reference(str(tmp_path / "i"))


def _as_built_before(index_dir) -> None:
    """Rewrites an index as dn2 built it before issue 28: no loo_score for removed rows, no
    tail nor includes_removed in the manifest."""
    path = index_dir / "normal.parquet"
    t = pq.read_table(path)
    kept = t.column("kept").to_numpy()
    loo = np.where(kept, t.column("loo_score").to_numpy(), np.nan)
    d = t.column("loo_distances")
    t = t.set_column(t.schema.get_field_index("loo_score"), "loo_score", pa.array(loo))
    t = t.set_column(t.schema.get_field_index("loo_distances"), "loo_distances",
                     pa.array([v if k else None for v, k in zip(d.to_pylist(), kept,
                                                                 strict=True)], d.type))
    if "clean_score" in t.column_names:
        t = t.drop_columns(["clean_score"])
    pq.write_table(t, path)
    marker = json.loads((index_dir / "_SUCCESS").read_text())
    marker["files"]["normal.parquet"] = hashlib.sha256(path.read_bytes()).hexdigest()
    for key in ("tail", "includes_removed"):
        del marker["reference"][key]
    (index_dir / "_SUCCESS").write_text(json.dumps(marker))


def test_an_index_built_before_the_tail_fits_it_from_its_kept_rows(feats, tmp_path):
    features_dir, X = feats
    build_index(str(features_dir), str(tmp_path / "i"), IndexConfig(k=2, clean_fraction=0.1))
    new = load_reference(str(tmp_path / "i"))
    assert new.n == 400  # the 40 removed rows are in a new index's reference
    _as_built_before(tmp_path / "i")
    loaded = LoadedIndex(str(tmp_path / "i"), device="cpu")
    kept = pq.read_table(tmp_path / "i" / "normal.parquet").column("kept").to_numpy()
    loo = pq.read_table(tmp_path / "i" / "normal.parquet").column("loo_score").to_numpy()
    ref = loaded.reference
    assert ref.n == kept.sum() == 360
    np.testing.assert_array_equal(ref.scores, np.sort(loo[kept]))
    assert ref.tail is not None and ref.tail == fit_tail(loo[kept])
    light = load_reference(str(tmp_path / "i"))
    np.testing.assert_array_equal(light.scores, ref.scores)
    assert light.tail == ref.tail
    xq = np.concatenate([X[:5], X[:3] + 6.0])
    s, _, _ = loaded.search(xq)
    p, source = loaded.p_values(s)
    np.testing.assert_allclose(s, brute_scores(xq, X[kept], 2), rtol=1e-5)
    assert set(source[:5]) == {"rank"} and set(source[5:]) == {"tail"}
    assert (p[5:] < 1 / (ref.n + 1)).all()
