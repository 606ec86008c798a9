"""Group mode end to end through the dn2 command: lots of real digit images in folders."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from benchmarks.datasets import write_manifest, write_png_store
from dn2ops.io.features import embeddings, read_table
from dn2ops.score.sets import group_schema
from pipelines.cli import main

MIXED = "lot-mixed"


def _images():
    digits = load_digits()
    images = np.kron(digits.images, np.ones((4, 4)))  # 8x8 -> 32x32 as in tests/conftest.py
    return (images * (255 / 16)).round().astype(np.uint8), digits.target


@pytest.fixture(scope="module")
def lots(tmp_path_factory):
    """normal/lot-n0..n3: 5 zeros each. incoming/lot-a..c: 5 zeros each, lot-mixed: digits
    1..5, lot-solo: one zero. incoming.csv lists incoming with its lot in a ``lot`` column."""
    root = tmp_path_factory.mktemp("lots")
    images, target = _images()
    zeros = iter(np.flatnonzero(target == 0))
    normal = {f"lot-n{i}": [next(zeros) for _ in range(5)] for i in range(4)}
    incoming = {f"lot-{c}": [next(zeros) for _ in range(5)] for c in "abc"}
    incoming[MIXED] = [int(np.flatnonzero(target == d)[0]) for d in range(1, 6)]
    incoming["lot-solo"] = [next(zeros)]
    for part, groups in (("normal", normal), ("incoming", incoming)):
        names = [f"{lot}/{j}" for lot, idx in groups.items() for j in range(len(idx))]
        write_png_store(images[[i for idx in groups.values() for i in idx]], names,
                        str(root / part))
    write_manifest([{"uri": f"incoming/{lot}/{j}.png", "lot": lot}
                    for lot, idx in incoming.items() for j in range(len(idx))],
                   str(root / "incoming.csv"))
    return root


@pytest.fixture(scope="module")
def knn_out(lots, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    code = main(["run", "--normal", str(lots / "normal"), "--input", str(lots / "incoming.csv"),
                 "--output", str(out), "--group-by", "parent_dir", "--top", "2"])
    assert code == 0
    return out


def _groups(results) -> list[dict]:
    return sorted(read_table(str(results), "groups").to_pylist(), key=lambda g: g["group"])


def _by_folder(features_dir) -> dict[str, np.ndarray]:
    table = read_table(str(features_dir), "features")
    X = embeddings(table)
    folders = np.array([u.rsplit("/", 2)[-2] for u in table.column("uri").to_pylist()])
    return {f: X[folders == f] for f in sorted(set(folders))}


def test_knn_mode_ranks_the_mixed_lot_first(knn_out, lots):
    groups = _groups(knn_out / "results")
    names = [g["group"].rsplit("/", 1)[-1] for g in groups]
    assert names == ["lot-a", "lot-b", "lot-c", MIXED]
    assert {g["group"].rsplit("/", 1)[-1]: g["rank"] for g in groups}[MIXED] == 1
    normal = _by_folder(knn_out / "normal_features")
    pooled_normal = np.stack([x.mean(axis=0) for x in normal.values()]).astype(np.float64)
    incoming = _by_folder(knn_out / "features")
    for g, name in zip(groups, names, strict=True):
        d = np.linalg.norm(pooled_normal - incoming[name].mean(axis=0), axis=1)
        assert g["score"] == pytest.approx(np.sort(d)[:2].mean(), rel=1e-5)
        assert [n.rsplit("/", 1)[-1] for n in g["neighbor_groups"]] == [
            list(normal)[j] for j in np.argsort(d)[:2]]
        assert g["size"] == 5 and len(g["member_uris"]) == 5
        assert all(u.startswith(g["group"] + "/") for u in g["member_uris"])
    schema = pq.read_schema(next((knn_out / "results").glob("groups-*.parquet")))
    assert schema.names == group_schema().names
    assert [schema.field(c).type for c in schema.names] == list(group_schema().types)
    top = (knn_out / "results" / "top_groups.csv").read_text().splitlines()
    assert len(top) == 3 and top[1].startswith("1,") and MIXED in top[1]


def test_every_image_is_accounted_for_and_the_solo_lot_is_an_error(knn_out, lots):
    summary = json.loads((knn_out / "results" / "summary.json").read_text())
    assert summary["count_in"] == 21
    assert summary["scored"] == 20 and summary["errored"] == 1
    assert summary["errors_by_stage"] == {"group": 1}
    assert summary["groups"] == {"group_by": "parent_dir", "method": "knn", "pool": "mean",
                                 "scored": 4, "errored": 1}
    errors = read_table(str(knn_out / "results"), "errors").to_pylist()
    assert [e["uri"].rsplit("/", 2)[-2:] for e in errors] == [["lot-solo", "0.png"]]
    assert errors[0]["stage"] == "group" and "has 1 image" in errors[0]["error"]
    manifest = json.loads((knn_out / "index" / "_SUCCESS").read_text())
    assert manifest["group_by"] == "parent_dir" and manifest["pool"] == "mean"
    assert manifest["group_counts"]["sets_indexed"] == 4
    # The default cleaning (auto) needs at least 50 sets to estimate their spread: it says so.
    assert manifest["cleaning"]["rule"] == "not applied" and manifest["counts"]["dropped"] == 0
    assert "4 normal rows" in manifest["cleaning"]["why"]


def test_sets_get_p_values_against_the_normal_sets_and_flags(knn_out):
    """4 normal sets: p >= 1/5, so BH at 5 % can flag none, and the summary says why."""
    groups = _groups(knn_out / "results")
    ref = pq.read_table(knn_out / "index" / "normal.parquet").column("loo_score").to_numpy()
    for g in groups:
        assert g["p_value"] == pytest.approx((1 + np.sum(ref >= g["score"])) / 5)
        assert g["p_value_source"] == "rank" and g["flagged"] is False
    summary = json.loads((knn_out / "results" / "summary.json").read_text())
    assert summary["flags"] == {"rule": "fdr", "level": 0.05, "flagged": 0, "threshold": None,
                                "p_value_floor": 0.2, "reference_n": 4}
    assert "nothing can be flagged" in summary["warnings"][0]
    top = (knn_out / "results" / "top_groups.csv").read_text().splitlines()
    assert top[0] == "rank,score,p_value,flagged,group,size,neighbor_groups"


def test_covtrace_needs_no_index_and_a_manifest_column_groups_alike(knn_out, tmp_path):
    incoming = _by_folder(knn_out / "features")
    expected = {n: x.astype(np.float64).var(axis=0, ddof=1).sum()
                for n, x in incoming.items() if len(x) > 1}
    results = {}
    for key in ("parent_dir", "lot"):
        out = tmp_path / key
        assert main(["score", "--features", str(knn_out / "features"), "--output", str(out),
                     "--group-by", key, "--group-score", "covtrace"]) == 0
        results[key] = {g["group"].rsplit("/", 1)[-1]: g for g in _groups(out)}
        got = results[key]
        assert set(got) == set(expected)
        for name, g in got.items():
            assert g["score"] == pytest.approx(expected[name], rel=1e-5)
            assert g["method"] == "covtrace" and g["index_id"] is None
            assert g["p_value"] is None and g["flagged"] is None
        assert got[MIXED]["rank"] == 1
        summary = json.loads((out / "summary.json").read_text())
        assert summary["count_in"] == summary["scored"] + summary["errored"] == 21
        assert summary["flags"]["rule"] is None and "covtrace" in summary["flags"]["why"]
    assert {n: g["rank"] for n, g in results["lot"].items()} == {
        n: g["rank"] for n, g in results["parent_dir"].items()}


def test_index_and_mode_mismatches_are_refused(knn_out, tmp_path, capsys):
    image_index = tmp_path / "image_index"
    assert main(["build-index", "--features", str(knn_out / "normal_features"),
                 "--output", str(image_index)]) == 0
    assert main(["score", "--features", str(knn_out / "features"), "--index", str(image_index),
                 "--output", str(tmp_path / "r1"), "--group-by", "parent_dir"]) == 1
    assert "built over single images" in capsys.readouterr().err
    assert main(["score", "--features", str(knn_out / "features"),
                 "--index", str(knn_out / "index"), "--output", str(tmp_path / "r2")]) == 1
    assert "built over sets" in capsys.readouterr().err
    assert main(["score", "--features", str(knn_out / "features"),
                 "--index", str(knn_out / "index"), "--output", str(tmp_path / "r3"),
                 "--group-by", "camera"]) == 1
    assert "not a manifest column" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # knn needs an index
        main(["score", "--features", str(knn_out / "features"), "--output", str(tmp_path / "r4"),
              "--group-by", "parent_dir"])
    assert exit_info.value.code == 2
    assert "--index is required" in capsys.readouterr().err
