"""ONNX export: the exported graph computes the torch module; exports are cached by the
plan's weights in a directory only its owner can write, and a cached file that does not
match the sha256 recorded when it was written (truncated, corrupt, planted) is never run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import dn2ops.embed.export
import dn2ops.embed.exporter
from dn2ops.config import EmbedConfig
from dn2ops.embed.backbones import WeightsError, get_spec
from dn2ops.embed.export import (
    OPSET,
    RECORD,
    CacheDirError,
    cache_root,
    cached_export,
    export_dir,
    exported_model,
    file_sha256,
    private_dir,
    weights_sha256,
)
from dn2ops.embed.exporter import Normalized, to_onnx
from dn2ops.embed.plan import EmbedPlan
from dn2ops.embed.preprocess import Preprocessing

PRE = Preprocessing(resize=8, crop=8, mean=(0.5, 0.25, 0.125), std=(0.5, 0.5, 0.25))
NOBODY = 65534
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))


def _tiny(scale: float = 1.0) -> nn.Module:
    """A one-layer 'backbone' with hand-set weights: conv 3 -> 2 channels, pooled."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]]).view(2, 3, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, scale]))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def _never_loaded():
    raise AssertionError("the torch backbone was loaded although the cache holds its export")


def test_normalized_is_the_preprocessing_normalisation_then_the_model():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    model = _tiny()
    with torch.no_grad():
        expected = model(PRE.normalize(x))
        got = Normalized(model, PRE)(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # by hand for channel 0 of image 0: mean of (x / 255 - 0.5) / 0.5
    by_hand = ((x[0, 0].double() / 255 - 0.5) / 0.5).mean()
    assert abs(float(got[0, 0]) - float(by_hand)) < 1e-5


def test_weights_sha256_changes_with_any_weight_and_only_with_weights():
    assert weights_sha256(_tiny()) == weights_sha256(_tiny())
    assert weights_sha256(_tiny()) != weights_sha256(_tiny(scale=2.0))
    # 0-d tensors (BatchNorm's num_batches_tracked) hash too
    assert len(weights_sha256(nn.BatchNorm2d(3))) == 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = private_dir(str(tmp_path_factory.mktemp("exports") / "cache"))
    return cache, cached_export(cache, "tiny", weights_sha256(_tiny()), PRE, _tiny)


def test_export_runs_like_the_module_at_any_batch_size(exported):
    ort = pytest.importorskip("onnxruntime")
    _, path = exported
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    for n in (1, 5):
        x = np.random.default_rng(n).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
        with torch.no_grad():
            expected = Normalized(_tiny(), PRE)(torch.from_numpy(x)).numpy()
        got = session.run(None, {"images": x})[0]
        assert got.shape == (n, 2)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_export_is_cached_by_weights_with_its_sha256_recorded(exported, monkeypatch):
    cache, path = exported
    assert os.path.basename(path).startswith("tiny-") and path.endswith(".onnx")
    onnx.checker.check_model(path)
    with open(path + RECORD) as f:
        record = json.load(f)
    assert record["sha256"] == file_sha256(path) and record["size"] == os.path.getsize(path)
    assert record["key"]["weights_sha256"] == weights_sha256(_tiny())
    mtime = os.path.getmtime(path)

    def no_export(*args):
        raise AssertionError("exported again although the cache holds these weights")

    monkeypatch.setattr(dn2ops.embed.exporter, "to_onnx", no_export)
    assert cached_export(cache, "tiny", weights_sha256(_tiny()), PRE, _never_loaded) == path
    assert os.path.getmtime(path) == mtime
    with pytest.raises(AssertionError, match="exported again"):  # other weights: a new file
        cached_export(cache, "tiny", weights_sha256(_tiny(3.0)), PRE, lambda: _tiny(3.0))
    name = os.path.basename(path)
    names = os.listdir(cache)  # besides lock files: no temporary left behind
    assert sorted(n for n in names if not n.endswith(".lock")) == [name, name + RECORD]


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _other_record(path):
    with open(path + RECORD) as f:
        record = json.load(f)
    record["key"]["weights_sha256"] = weights_sha256(_tiny(3.0))
    with open(path + RECORD, "w") as f:
        json.dump(record, f)


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "(truncated or replaced)"),
    (_flip_a_byte, "does not match the sha256 recorded"),
    (lambda path: os.remove(path + RECORD), "has no sha256 record"),
    (lambda path: open(path + RECORD, "w").write("{"), "unreadable record"),
    (_other_record, "record of another export"),
])
def test_a_damaged_export_is_exported_again_never_used(exported, tmp_path, damage, reason,
                                                       caplog):
    good_cache, good = exported
    cache = private_dir(str(tmp_path / "cache"))
    for name in os.listdir(good_cache):
        shutil.copy(os.path.join(good_cache, name), cache)
    path = os.path.join(cache, os.path.basename(good))
    damage(path)
    with caplog.at_level(logging.WARNING, logger="dn2"):
        assert cached_export(cache, "tiny", weights_sha256(_tiny()), PRE, _tiny) == path
    assert reason in caplog.text and "exporting it again" in caplog.text
    # the export is deterministic: the file is the good one again, with its record
    assert open(path, "rb").read() == open(good, "rb").read()
    assert open(path + RECORD).read() == open(good + RECORD).read()



CONCURRENT = """
import sys
from dn2ops.embed.export import cached_export, private_dir, weights_sha256
from tests.dn2ops.embed.test_export import PRE, _tiny

def load():
    open(sys.argv[2], "w").close()
    return _tiny()

cached_export(private_dir(sys.argv[1]), "tiny", weights_sha256(_tiny()), PRE, load)
"""


def test_processes_that_start_at_once_export_once(tmp_path):
    """The second waits on the first's lock, then finds its export (each Beam worker
    process of a machine calls load_model at its start)."""
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path / "cache"),
                               str(tmp_path / f"loaded-{i}")], cwd=REPO) for i in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    assert len(list(tmp_path.glob("loaded-*"))) == 1


NO_TORCH = """
import sys
from dn2ops.embed.export import cached_export
from dn2ops.embed.preprocess import Preprocessing

pre = Preprocessing(resize=8, crop=8, mean=(0.5, 0.25, 0.125), std=(0.5, 0.5, 0.25))
print(cached_export(sys.argv[1], "tiny", sys.argv[2], pre, load=None))
assert "torch" not in sys.modules, "torch was imported"
"""


def test_a_cached_export_is_found_without_importing_torch(exported):
    """A CPU-engine worker whose export is cached needs no torch (0.5 GB a process)."""
    cache, path = exported
    out = subprocess.run([sys.executable, "-c", NO_TORCH, cache, weights_sha256(_tiny())],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == path

# --- through the plan, with a real backbone ----------------------------------------


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """The plan of efficientnet_lite0 (offline weights) with its own cache, exported."""
    cache = str(tmp_path_factory.mktemp("lite0") / "cache")
    plan = EmbedPlan.resolve(EmbedConfig(backbone="efficientnet_lite0", engine="onnxruntime",
                                         device="cpu", batch_size=4, cache_dir=cache))
    return plan, exported_model(plan)


def test_a_cached_export_is_found_by_the_plan_without_loading_the_backbone(lite0,
                                                                          monkeypatch):
    plan, path = lite0
    monkeypatch.setattr(dn2ops.embed.export, "load_backbone", lambda *a: _never_loaded())
    assert exported_model(plan) == path
    assert os.path.dirname(path) == os.path.join(plan.config.cache_dir, "exports")


def test_a_planted_model_is_never_run(lite0, caplog):
    """Another network with the same input and output, exported to ONNX under the
    expected name: the worker's engine does not run it, and features stay those of a
    fresh export."""
    pytest.importorskip("onnxruntime")
    from dn2ops.engines.onnxruntime import OnnxBackboneModelHandler

    plan, path = lite0
    images = list(np.random.default_rng(0).integers(0, 256, (4, 3, 224, 224), dtype=np.uint8))

    def features() -> np.ndarray:
        handler = OnnxBackboneModelHandler(plan)
        model = handler.load_model()
        return np.stack([r.inference for r in handler.run_inference(images, model)])

    want = features()
    plant = nn.Sequential(nn.Conv2d(3, 1280, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    to_onnx(Normalized(plant, plan.preprocessing).eval(), plan.preprocessing.crop, path, OPSET)
    onnx.checker.check_model(path)  # a valid model, which would change the features:
    import onnxruntime as ort

    planted = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert np.abs(planted.run(None, {"images": np.stack(images)})[0] - want).max() > 1.0
    with caplog.at_level(logging.WARNING, logger="dn2"):
        got = features()
    assert f"the cached export {path} is " in caplog.text  # another size (28 KB)
    assert "(truncated or replaced); exporting it again" in caplog.text
    np.testing.assert_array_equal(got, want)


def test_weights_changed_since_the_plan_are_refused(tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(get_spec("resnet18").build().state_dict(), weights)
    plan = EmbedPlan.resolve(EmbedConfig(backbone="resnet18", weights=str(weights),
                                         cache_dir=str(tmp_path / "cache")))
    torch.save(get_spec("resnet18").build().state_dict(), weights)  # other random weights
    with pytest.raises(WeightsError, match="changed since the job was launched"):
        exported_model(plan)
    assert [n for n in os.listdir(tmp_path / "cache" / "exports") if not n.endswith(".lock")
            ] == []


# --- the cache directory -----------------------------------------------------------


def test_the_cache_follows_the_flag_then_dn2_cache_dir_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DN2_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == str(tmp_path / "home" / ".cache" / "dn2")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute only
    assert cache_root() == str(tmp_path / "home" / ".cache" / "dn2")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == str(tmp_path / "xdg" / "dn2")
    monkeypatch.setenv("DN2_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == str(tmp_path / "env")
    assert cache_root(str(tmp_path / "flag")) == str(tmp_path / "flag")


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_a_fresh_cache_is_created_private(tmp_path, umask):
    old = os.umask(umask)
    try:
        exports = export_dir(str(tmp_path / "new" / "dn2"))
    finally:
        os.umask(old)
    assert exports == str(tmp_path / "new" / "dn2" / "exports")
    for d in (tmp_path / "new", tmp_path / "new" / "dn2", tmp_path / "new" / "dn2" / "exports"):
        st = os.stat(d)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o722])
def test_a_cache_others_can_write_is_refused(tmp_path, mode):
    cache = tmp_path / "shared"
    cache.mkdir()
    os.chmod(cache, mode)
    with pytest.raises(CacheDirError) as e:
        export_dir(str(cache))
    message = str(e.value)
    assert (f"the dn2 cache directory {cache} is writable by other users (mode {mode:04o})"
            in message)
    assert f"chmod go-w {cache}" in message and "--cache-dir" in message
    assert os.listdir(cache) == []  # nothing written into it


def test_a_writable_exports_dir_is_refused_too(tmp_path):
    exports = tmp_path / "cache" / "exports"
    exports.mkdir(parents=True, mode=0o700)
    os.chmod(exports, 0o777)
    with pytest.raises(CacheDirError, match=f"{exports} is writable by other users"):
        export_dir(str(tmp_path / "cache"))


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a directory to another user needs root")
def test_a_cache_owned_by_another_user_is_refused(tmp_path):
    cache = tmp_path / "theirs"
    cache.mkdir(mode=0o700)
    os.chown(cache, NOBODY, NOBODY)
    with pytest.raises(CacheDirError) as e:
        export_dir(str(cache))
    message = str(e.value)
    assert f"the dn2 cache directory {cache} is owned by " in message
    assert f"(uid {NOBODY}), not by " in message and "(mode 0700)" in message
    assert "remove it (dn2 creates its own with mode 0700)" in message


def test_a_cache_under_a_directory_others_can_write_is_refused(tmp_path):
    parent = tmp_path / "open"
    (parent / "dn2").mkdir(parents=True, mode=0o700)
    os.chmod(parent, 0o777)
    with pytest.raises(CacheDirError, match=f"a directory above the dn2 cache {parent} is "
                                            "writable by other users"):
        export_dir(str(parent / "dn2"))
    os.chmod(parent, 0o1777)  # sticky, as /tmp: others cannot rename what is ours
    assert export_dir(str(parent / "dn2")) == str(parent / "dn2" / "exports")


def test_a_symlink_to_a_shared_directory_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (tmp_path / "mine").symlink_to(shared)
    with pytest.raises(CacheDirError, match=f"{shared} is writable by other users"):
        export_dir(str(tmp_path / "mine"))
