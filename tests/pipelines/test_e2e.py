"""End to end through the dn2 command on small real image stores (local and memory://)."""

from __future__ import annotations

import csv
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.datasets import write_png_store
from dn2ops.config import CLEAN_AUTO_MIN_ROWS, DEFAULT_BACKBONE
from dn2ops.io.features import embeddings, read_table
from pipelines.cli import main
from tests.conftest import brute_scores, digit_images, root4_l2
from tests.dn2ops.score.test_decisions import brute_bh


def _results(results_dir) -> list[dict]:
    table = read_table(str(results_dir), "anomalies")
    return sorted(table.to_pylist(), key=lambda r: r["uri"])


def _kept(index_dir) -> np.ndarray:
    """The normal rows (n,) bool an index holds: those its cleaning did not remove."""
    return pq.read_table(index_dir / "normal.parquet").column("kept").to_numpy()


@pytest.fixture(scope="module")
def run_out(digit_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    code = main(["run", "--normal", str(digit_store / "normal"),
                 "--input", str(digit_store / "incoming.csv"), "--output", str(out),
                 "--top", "5", "--partition", "dt=2026-11-28"])
    assert code == 0
    return out


def test_every_input_is_accounted_for(run_out, digit_store):
    summary = json.loads((run_out / "results" / "summary.json").read_text())
    n_files = len(list((digit_store / "incoming").glob("*.png")))
    assert summary["count_in"] == n_files
    assert summary["scored"] + summary["errored"] == n_files
    assert summary["errored"] == 0
    uris = {r["uri"] for r in _results(run_out / "results")}
    assert uris == {str(p) for p in (digit_store / "incoming").glob("*.png")}


def test_scores_equal_brute_force_over_written_shards(run_out):
    """The default index (--feature-transform root4-l2, recorded in its manifest) scores
    by distances between root4-l2 features, computed here by hand from the shards."""
    assert json.loads((run_out / "index" / "_SUCCESS").read_text())["feature_transform"] \
        == "root4-l2"
    normal = read_table(str(run_out / "normal_features"), "features")
    incoming = read_table(str(run_out / "features"), "features")
    kept = _kept(run_out / "index")  # what the default cleaning left (test below)
    xq_all, xb = root4_l2(embeddings(incoming)), root4_l2(embeddings(normal))[kept]
    expected = dict(zip(incoming.column("uri").to_pylist(),
                        brute_scores(xq_all, xb, k=2), strict=True))
    rows = _results(run_out / "results")
    got = np.array([r["score"] for r in rows])
    np.testing.assert_allclose(got, [expected[r["uri"]] for r in rows], rtol=1e-4)
    normal_uris = list(np.array(normal.column("uri").to_pylist())[kept])
    for r in rows[:5]:  # the explanation: the k nearest normal images, nearest first
        xq = xq_all[incoming.column("uri").to_pylist().index(r["uri"])]
        d = np.linalg.norm(xb - xq, axis=1)
        assert r["neighbor_uris"] == [normal_uris[i] for i in np.argsort(d)[:2]]


def test_the_default_does_not_clean_a_few_normal_images_and_says_why(run_out):
    """dn2 run asks for the auto rule, which needs at least CLEAN_AUTO_MIN_ROWS (50) normal
    rows to estimate their spread: with 24 it keeps them all and the manifest says why
    (the rule itself, on larger sets: tests/dn2ops/index/test_cleaning.py)."""
    manifest = json.loads((run_out / "index" / "_SUCCESS").read_text())
    normal = pq.read_table(run_out / "index" / "normal.parquet")
    c = manifest["cleaning"]
    assert c["rule"] == "not applied" and c["asked"] == "auto" and c["removed"] == 0
    assert f"24 normal rows: the auto rule needs at least {CLEAN_AUTO_MIN_ROWS}" in c["why"]
    assert normal.column("kept").to_numpy().all() and manifest["counts"]["dropped"] == 0
    assert np.isnan(normal.column("clean_score").to_numpy()).all()


def test_ranks_follow_scores(run_out):
    rows = _results(run_out / "results")
    scores = np.array([r["score"] for r in rows])
    for r in rows:
        assert r["rank"] == 1 + int((scores > r["score"]).sum())
    assert {r["partition"] for r in rows} == {"dt=2026-11-28"}
    top = (run_out / "results" / "top_anomalies.csv").read_text().splitlines()
    assert len(top) == 6 and top[1].startswith("1,")


def test_p_values_flags_and_drift_in_the_table_and_summary(run_out):
    """Every row's p-value against the index's reference, counted by hand; flags by BH
    over the partition; summary.json says the rule, level, count, threshold and drift.
    24 normal images: p >= 1/25, above what BH needs over 30 rows, which is said."""
    rows = _results(run_out / "results")
    normal = pq.read_table(run_out / "index" / "normal.parquet")
    ref = normal.column("loo_score").to_numpy(zero_copy_only=False)
    scores = np.array([r["score"] for r in rows])
    p = np.array([(1 + np.sum(ref >= s)) / (len(ref) + 1) for s in scores])
    np.testing.assert_allclose([r["p_value"] for r in rows], p, rtol=1e-12)
    assert {r["p_value_source"] for r in rows} == {"rank"}
    assert [r["flagged"] for r in rows] == brute_bh(p, 0.05).tolist()
    summary = json.loads((run_out / "results" / "summary.json").read_text())
    assert summary["flags"] == {"rule": "fdr", "level": 0.05, "flagged": 0, "threshold": None,
                                "p_value_floor": pytest.approx(1 / 25), "reference_n": 24}
    assert summary["drift"]["test"] == "ks-uniform" and not summary["drift"]["warn"]
    (warning,) = summary["warnings"]
    assert "a lone anomaly cannot be flagged" in warning and "24 scores" in warning
    top = (run_out / "results" / "top_anomalies.csv").read_text().splitlines()
    assert top[0] == "rank,score,percentile,p_value,flagged,uri,neighbor_uris,heatmap_uri"
    marker = json.loads((run_out / "results" / "_SUCCESS").read_text())
    assert (marker["flags"], marker["drift"]) == (summary["flags"], summary["drift"])


def test_alpha_flags_rows_and_an_unreachable_alpha_is_refused(run_out, tmp_path, capsys):
    args = ["score", "--features", str(run_out / "features"), "--index",
            str(run_out / "index"), "--top", "30"]
    assert main([*args, "--output", str(tmp_path / "a"), "--alpha", "0.05"]) == 0
    rows = _results(tmp_path / "a")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    flagged = [r for r in rows if r["flagged"]]
    assert flagged and all(r["p_value"] <= 0.05 for r in flagged)
    assert all(r["p_value"] > 0.05 for r in rows if not r["flagged"])
    assert summary["flags"]["rule"] == "alpha" and summary["flags"]["level"] == 0.05
    assert summary["flags"]["flagged"] == len(flagged) and summary["warnings"] == []
    assert summary["flags"]["threshold"] == min(r["score"] for r in flagged)
    top = list(csv.DictReader(open(tmp_path / "a" / "top_anomalies.csv")))
    assert [r["flagged"] for r in top] == ["true"] * len(flagged) + ["false"] * (
        30 - len(flagged))
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "b"), "--alpha", "0.01"]) == 1
    err = capsys.readouterr().err
    assert ("dn2 score: error: --alpha 0.01 asks for p <= 0.01, but the normal reference of "
            "24 scores gives p no lower than 0.04 (no fitted tail): nothing can be flagged; "
            "use --alpha >= 0.04 or build the index") in err
    assert not (tmp_path / "b").exists()


def test_manifest_columns_are_carried_and_anomalies_rank_high(run_out):
    from sklearn.metrics import roc_auc_score
    rows = _results(run_out / "results")
    labels = [int(r["label"]) for r in rows]
    assert roc_auc_score(labels, [r["score"] for r in rows]) > 0.9


def test_three_shards_give_the_same_table(run_out, tmp_path):
    assert main(["build-index", "--features", str(run_out / "normal_features"),
                 "--output", str(tmp_path / "index3"), "--shards", "3"]) == 0
    manifest = json.loads((tmp_path / "index3" / "_SUCCESS").read_text())
    assert manifest["shards"] == 3
    assert main(["score", "--features", str(run_out / "features"), "--index",
                 str(tmp_path / "index3"), "--output", str(tmp_path / "res3"),
                 "--partition", "dt=2026-11-28"]) == 0
    one, three = _results(run_out / "results"), _results(tmp_path / "res3")
    for a, b in zip(one, three, strict=True):
        assert (a["uri"], a["rank"], a["neighbor_uris"]) == (b["uri"], b["rank"],
                                                             b["neighbor_uris"])
        assert a["score"] == pytest.approx(b["score"], rel=1e-6)


def test_rerun_replaces_outputs(run_out, tmp_path):
    out = tmp_path / "res"
    args = ["score", "--features", str(run_out / "features"), "--index",
            str(run_out / "index"), "--output", str(out)]
    assert main(args) == 0
    first = _results(out)
    assert main(args) == 0
    assert _results(out) == [dict(r) for r in first]
    assert len(list(out.glob("anomalies-*.parquet"))) == 1
    assert not list(out.glob("_staging-*"))


def test_memory_store_embeds_like_the_local_store(digit_store, tmp_path):
    normal, _, _ = digit_images()
    fs = fsspec.filesystem("memory")
    write_png_store(normal[:6], [f"n{i:03d}" for i in range(6)], "memory://dn2-test/store")
    assert main(["embed", "--input", "memory://dn2-test/store", "--output",
                 str(tmp_path / "mem")]) == 0
    assert main(["embed", "--input", str(digit_store / "normal" / "n00[0-5].png"),
                 "--output", str(tmp_path / "local")]) == 0
    mem = read_table(str(tmp_path / "mem"), "features")
    local = read_table(str(tmp_path / "local"), "features")
    assert sorted(mem.column("uri").to_pylist()) == [
        f"memory:///dn2-test/store/n{i:03d}.png" for i in range(6)]
    by_name = {u.rsplit("/", 1)[1]: e for u, e in zip(mem.column("uri").to_pylist(),
                                                      embeddings(mem), strict=True)}
    for u, e in zip(local.column("uri").to_pylist(), embeddings(local), strict=True):
        np.testing.assert_allclose(by_name[u.rsplit("/", 1)[1]], e, rtol=1e-5, atol=1e-5)
    assert mem.column("sha256").to_pylist() != [None] * 6
    fs.rm("/dn2-test", recursive=True)


def test_feature_shards_are_named_and_typed(run_out):
    files = sorted((run_out / "features").glob("features-*.parquet"))
    assert files and all("-of-" in f.name for f in files)
    schema = pq.read_schema(files[0])
    assert schema.field("embedding").type.value_type == pa.float32()
    marker = json.loads((run_out / "features" / "_SUCCESS").read_text())
    assert marker["backbone"] == DEFAULT_BACKBONE and marker["dim"] == 2560  # lite0 + lite1


@pytest.mark.parametrize("argv, message", [
    (["embed", "--output", "x"], "required: --input"),
    (["score", "--index", "i", "--output", "o"], "one of the arguments --input --features"),
    (["build-index", "--features", "f", "--output", "o", "--k", "0"], "positive integer"),
    (["embed", "--input", "a", "--output", "b", "--bogus-flag"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    code = main(["embed", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


def test_feature_transform_none_is_the_papers_raw_features(run_out, tmp_path):
    assert main(["build-index", "--features", str(run_out / "normal_features"),
                 "--output", str(tmp_path / "index"), "--feature-transform", "none"]) == 0
    assert main(["score", "--features", str(run_out / "features"), "--index",
                 str(tmp_path / "index"), "--output", str(tmp_path / "res")]) == 0
    normal = read_table(str(run_out / "normal_features"), "features")
    incoming = read_table(str(run_out / "features"), "features")
    expected = dict(zip(incoming.column("uri").to_pylist(), brute_scores(
        embeddings(incoming), embeddings(normal)[_kept(tmp_path / "index")], k=2), strict=True))
    rows = _results(tmp_path / "res")
    np.testing.assert_allclose([r["score"] for r in rows], [expected[r["uri"]] for r in rows],
                               rtol=1e-5)
    assert json.loads((tmp_path / "index" / "_SUCCESS").read_text())["feature_transform"] \
        == "none"


def test_hnsw_index_through_the_command_line(run_out, tmp_path):
    """dn2 build-index --hnsw: the scores are the mean distance to real normal images, never
    below the exact (brute-force) scores, and equal to them where the neighbours are the
    true ones (efSearch 1024 over this small normal set: all of them here)."""
    assert main(["build-index", "--features", str(run_out / "normal_features"), "--output",
                 str(tmp_path / "index"), "--hnsw", "8", "--ef-search", "1024"]) == 0
    manifest = json.loads((tmp_path / "index" / "_SUCCESS").read_text())
    assert manifest["hnsw"]["m"] == 8 and manifest["hnsw"]["ef_search"] == 1024
    assert main(["score", "--features", str(run_out / "features"), "--index",
                 str(tmp_path / "index"), "--output", str(tmp_path / "res")]) == 0
    normal = read_table(str(run_out / "normal_features"), "features")
    incoming = read_table(str(run_out / "features"), "features")
    exact = dict(zip(incoming.column("uri").to_pylist(), brute_scores(
        root4_l2(embeddings(incoming)), root4_l2(embeddings(normal))[_kept(tmp_path / "index")],
        k=2), strict=True))
    rows = _results(tmp_path / "res")
    got = np.array([r["score"] for r in rows])
    want = np.array([exact[r["uri"]] for r in rows])
    assert (got >= want * (1 - 1e-4)).all()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    with pytest.raises(SystemExit) as e:
        main(["build-index", "--features", "f", "--output", "o", "--hnsw", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # refused where the flags are parsed
        main(["build-index", "--features", str(run_out / "normal_features"), "--output",
              str(tmp_path / "bad"), "--ef-search", "32"])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flags", [["--ivf", "64", "--nprobe", "1"], ["--hnsw", "32"]])
def test_a_missed_recall_target_is_warned_about(run_out, tmp_path, caplog, flags):
    caplog.set_level("INFO")
    assert main(["build-index", "--features", str(run_out / "normal_features"), "--output",
                 str(tmp_path / "index"), *flags]) == 0
    manifest = json.loads((tmp_path / "index" / "_SUCCESS").read_text())
    recall = manifest["ivf" if "--ivf" in flags else "hnsw"]["recall"]
    assert recall["target_reached"] == (recall["recall_at_k"] >= 0.95)
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "below the target" in
              r.getMessage()]
    assert len(warned) == (0 if recall["target_reached"] else 1)


def test_the_top_rows_have_heatmaps_and_the_others_none(run_out):
    """--top 5 and no --explain: the 5 top-ranked images get a heatmap (committed, listed
    in _SUCCESS, 16-bit at the image's size); every other row's columns are null."""
    from PIL import Image

    results = run_out / "results"
    rows = sorted(_results(results), key=lambda r: (r["rank"], r["uri"]))
    assert all(r["heatmap_uri"] and len(r["hot_box"]) == 4 for r in rows[:5])
    assert all(r["heatmap_uri"] is None and r["hot_box"] is None for r in rows[5:])
    marker = json.loads((results / "_SUCCESS").read_text())
    listed = {f["name"] for f in marker["committed_files"]}
    for r in rows[:5]:
        assert r["heatmap_uri"] in listed
        png = Image.open(results / r["heatmap_uri"])
        assert png.mode == "I;16" and png.size == Image.open(r["uri"]).size
    heat = json.loads((results / "summary.json").read_text())["heatmaps"]
    assert (heat["explained"], heat["asked"], heat["failed"]) == (5, 5, {})
    top = list(csv.DictReader(open(results / "top_anomalies.csv")))
    assert [t["heatmap_uri"] for t in top] == [r["heatmap_uri"] for r in rows[:5]]
