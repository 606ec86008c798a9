"""benchmarks/embed_reuse.py on a few real PNGs: the half-new split and what it reports."""

from __future__ import annotations

import csv

from benchmarks.embed_reuse import main, manifests


def _uris(path):
    with open(path) as f:
        return [r["uri"] for r in csv.DictReader(f)]


def test_the_half_new_manifest_holds_half_of_the_earlier_images(tmp_path):
    paths = [f"/x/{i}.png" for i in range(12)]  # 3N/2 = 12: N = 8
    earlier, half = manifests(str(tmp_path), "w", paths)
    assert _uris(earlier) == paths[:8]
    assert _uris(half) == paths[4:]
    assert len(set(_uris(half)) & set(_uris(earlier))) == 4


def test_reuse_copies_the_known_half_and_matches_a_full_embed(tmp_path):
    res = main(["--photos", "0", "--pngs", "16", "--out", str(tmp_path)])["pngs"]
    assert (res["full"]["embedded"], res["full"]["copied"]) == (16, 0)
    assert (res["reuse"]["embedded"], res["reuse"]["copied"]) == (8, 8)
    assert res["reuse"]["count_in"] == res["full"]["count_in"] == 16
    assert (res["all_known"]["embedded"], res["all_known"]["copied"]) == (0, 16)
    assert res["max_abs_diff"] <= 1e-4 * 5  # features of scale ~5 (Lite0)
    assert res["time_ratio"] == round(res["reuse"]["wall_s"] / res["full"]["wall_s"], 3)
