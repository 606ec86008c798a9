"""dn2ops.score.grouping: keys, pooling by key, the index of pooled normal sets, and the
index-mode check, against numpy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dn2ops.config import GroupConfig, IndexConfig
from dn2ops.index import IndexError_, LoadedIndex
from dn2ops.io import features, outputs
from dn2ops.score.grouping import (
    GroupKeyError,
    build_group_index,
    check_index_mode,
    group_key,
    pool_groups,
)
from tests.dn2ops.score.conftest import META, set_rows


def test_group_key_parent_dir_and_column():
    assert group_key({"uri": "gs://b/lots/lot-a/x.png"}, "parent_dir") == "gs://b/lots/lot-a"
    assert group_key({"uri": "/data/lot-b/y.png", "lot": "7"}, "parent_dir") == "/data/lot-b"
    assert group_key({"uri": "/data/lot-b/y.png", "lot": "7"}, "lot") == "7"
    for row in ({"uri": "a.png", "lot": ""}, {"uri": "a.png", "lot": None}, {"uri": "a.png"}):
        with pytest.raises(GroupKeyError, match="'lot'"):
            group_key(row, "lot")


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pool_groups_matches_numpy(pool):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5)).astype(np.float32)
    lots = rng.choice(["b", "a", "c"], size=40)
    order = rng.permutation(40)  # rows arrive in any order
    rows = [{"uri": f"u{i:03d}", "lot": lots[i]} for i in order]
    names, uris, pooled, sizes = pool_groups(rows, X[order], "lot", pool)
    assert names == ["a", "b", "c"]
    for name, members, vec, size in zip(names, uris, pooled, sizes, strict=True):
        idx = np.flatnonzero(lots == name)
        assert members == [f"u{i:03d}" for i in idx]  # sorted by uri
        assert size == len(idx)
        expected = X[idx].mean(axis=0) if pool == "mean" else X[idx].max(axis=0)
        np.testing.assert_allclose(vec, expected, rtol=1e-6)
        assert vec.dtype == np.float32


def test_pool_groups_names_images_without_key():
    with pytest.raises(GroupKeyError, match="1 image.*u1"):
        pool_groups([{"uri": "u0", "lot": "a"}, {"uri": "u1", "lot": ""}],
                    np.zeros((2, 3), np.float32), "lot")


def _features_dir(path, rows: list[dict], extra_columns=("lot",)) -> str:
    """A committed features directory holding ``rows``."""
    directory = str(path)
    staging = outputs.new_staging(directory)
    fs, stage = outputs.fs_and_path(staging)
    fs.makedirs(stage, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=features.feature_schema(extra_columns))
    pq.write_table(table, f"{stage}/features-00000-of-00001.parquet")
    outputs.commit(staging, directory, {"kind": features.KIND, **META,
                                        "extra_columns": list(extra_columns)})
    return directory


def test_build_group_index_pools_sets_and_drops_small_ones(tmp_path):
    rng = np.random.default_rng(3)
    groups = {f"lot{i}": rng.normal(size=(3 + i, 3)) for i in range(4)}
    groups["tiny"] = rng.normal(size=(1, 3))
    fdir = _features_dir(tmp_path / "f", set_rows(groups))
    manifest = build_group_index(fdir, str(tmp_path / "idx"), IndexConfig(),
                                 GroupConfig(group_by="lot", pool="max"))
    assert manifest["group_by"] == "lot" and manifest["pool"] == "max"
    assert manifest["group_counts"] == {"images": 19, "sets": 5, "sets_indexed": 4,
                                        "sets_too_small": 1, "images_in_indexed_sets": 18}
    loaded = LoadedIndex(str(tmp_path / "idx"))
    assert loaded.uris == ["lot0", "lot1", "lot2", "lot3"]
    expected = np.stack([groups[n].astype(np.float32).max(axis=0) for n in loaded.uris])
    np.testing.assert_allclose(np.concatenate(list(loaded.iter_shards())), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="not a manifest column"):
        build_group_index(fdir, str(tmp_path / "idx2"), IndexConfig(),
                          GroupConfig(group_by="camera"))


def test_index_mode_is_checked_both_ways():
    image_index = {"backbone": "test"}
    set_index = {"group_by": "lot", "pool": "mean"}
    assert check_index_mode(image_index, None, None) is None
    assert check_index_mode(set_index, "parent_dir", None) == "mean"
    with pytest.raises(IndexError_, match="single images"):
        check_index_mode(image_index, "lot", None)
    with pytest.raises(IndexError_, match="built over sets"):
        check_index_mode(set_index, None, None)
    with pytest.raises(IndexError_, match="--pool max"):
        check_index_mode(set_index, "lot", "max")
