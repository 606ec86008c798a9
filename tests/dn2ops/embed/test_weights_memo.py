"""weights_memo: the weights' sha256 kept in the private cache, keyed by the files' identity,
so that a launcher with unchanged weights starts without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fsspec
import torch

from dn2ops.config import DEFAULT_BACKBONE, EmbedConfig
from dn2ops.embed import backbones, weights_memo
from dn2ops.embed.backbones import get_spec
from dn2ops.embed.plan import weights_sha256


def _resnet(path, value: float) -> torch.nn.Module:
    model = get_spec("resnet18").build()
    torch.nn.init.constant_(model.conv1.weight, value)
    torch.save(model.state_dict(), path)
    return model


def _no_load(*args, **kwargs):
    raise AssertionError("the backbone was loaded")


def _memos(cache) -> list[str]:
    return sorted(os.listdir(cache / "weights"))


def test_a_miss_hashes_the_loaded_weights_and_a_hit_loads_nothing(tmp_path, monkeypatch):
    model = _resnet(tmp_path / "r18.pth", 0.5)
    config = EmbedConfig(backbone="resnet18", weights=str(tmp_path / "r18.pth"),
                         cache_dir=str(tmp_path / "cache"))
    spec = get_spec("resnet18")
    assert weights_memo.weights_sha256(spec, config) == weights_sha256(model)
    (name,) = _memos(tmp_path / "cache")
    assert os.stat(tmp_path / "cache" / "weights" / name).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "cache" / "weights").st_mode & 0o777 == 0o700
    monkeypatch.setattr(backbones, "load_backbone", _no_load)
    assert weights_memo.weights_sha256(spec, config) == weights_sha256(model)


def test_weights_rewritten_in_place_with_their_old_mtime_are_hashed_again(tmp_path):
    """Same path, same size, mtime set back: the ctime still tells."""
    path = tmp_path / "r18.pth"
    _resnet(path, 0.5)
    config = EmbedConfig(backbone="resnet18", weights=str(path),
                         cache_dir=str(tmp_path / "cache"))
    spec = get_spec("resnet18")
    first = weights_memo.weights_sha256(spec, config)
    before = os.stat(path)
    other = _resnet(path, 0.25)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(path) == before.st_size
    got = weights_memo.weights_sha256(spec, config)
    assert got == weights_sha256(other) != first
    assert len(_memos(tmp_path / "cache")) == 2


def test_a_damaged_or_foreign_memo_is_not_used(tmp_path):
    model = _resnet(tmp_path / "r18.pth", 0.5)
    config = EmbedConfig(backbone="resnet18", weights=str(tmp_path / "r18.pth"),
                         cache_dir=str(tmp_path / "cache"))
    spec = get_spec("resnet18")
    weights_memo.weights_sha256(spec, config)
    (name,) = _memos(tmp_path / "cache")
    memo = tmp_path / "cache" / "weights" / name
    record = json.loads(memo.read_text())
    for text in ("{not json", json.dumps([1]),
                 json.dumps({**record, "weights_sha256": "0" * 10}),
                 json.dumps({**record, "key": {**record["key"], "backbone": "resnet50"}})):
        memo.write_text(text)
        assert weights_memo.weights_sha256(spec, config) == weights_sha256(model)
        assert json.loads(memo.read_text()) == record  # written again


def test_a_cache_others_can_write_is_not_used_and_the_hash_is_still_right(tmp_path):
    model = _resnet(tmp_path / "r18.pth", 0.5)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    config = EmbedConfig(backbone="resnet18", weights=str(tmp_path / "r18.pth"),
                         cache_dir=str(shared))
    assert weights_memo.weights_sha256(get_spec("resnet18"), config) == weights_sha256(model)
    assert os.listdir(shared) == []


def test_random_weights_are_not_memoised(tmp_path):
    config = EmbedConfig(backbone="resnet18", weights="random",
                         cache_dir=str(tmp_path / "cache"))
    want = weights_sha256(backbones.load_backbone("resnet18", "random"))
    assert weights_memo.weights_sha256(get_spec("resnet18"), config) == want
    assert not (tmp_path / "cache" / "weights").exists()


def test_a_launcher_with_memoised_weights_imports_neither_torch_nor_faiss(tmp_path):
    """What `dn2 embed` imports before its pipeline runs, the second time on a machine."""
    code = f"""
import sys
from apache_beam.options.pipeline_options import PipelineOptions
import pipelines.cli, pipelines.embed
from pipelines.checks import preflight
from dn2ops.config import EmbedConfig
plan = preflight(EmbedConfig(backbone={DEFAULT_BACKBONE!r}, cache_dir={str(tmp_path)!r}),
                 PipelineOptions([]))
print(plan.weights_sha256, sorted(m for m in ("torch", "faiss", "scipy.stats")
                                  if m in sys.modules))
"""
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split(maxsplit=1) for _ in range(2)]
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].strip() == "['torch']"  # the first loads the weights to hash them
    assert runs[1][1].strip() == "[]"


def test_weights_that_are_not_local_files_are_hashed_each_time(tmp_path):
    weights = "memory://w/r18.pth"
    model = get_spec("resnet18").build()
    torch.nn.init.constant_(model.conv1.weight, 0.5)
    with fsspec.open(weights, "wb") as f:
        torch.save(model.state_dict(), f)
    config = EmbedConfig(backbone="resnet18", weights=weights,
                         cache_dir=str(tmp_path / "cache"))
    assert weights_memo.weights_sha256(get_spec("resnet18"), config) == weights_sha256(model)
    assert not (tmp_path / "cache" / "weights").exists()


def test_a_cache_dir_the_launcher_cannot_create_is_not_used(tmp_path):
    """A --cache-dir meant for Dataflow's workers (say /opt/dn2/cache) on a launcher where
    it cannot be made: the hash is still right."""
    model = _resnet(tmp_path / "r18.pth", 0.5)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    config = EmbedConfig(backbone="resnet18", weights=str(tmp_path / "r18.pth"),
                         cache_dir=str(blocked / "cache"))
    assert weights_memo.weights_sha256(get_spec("resnet18"), config) == weights_sha256(model)
