"""The exported backbone: one ONNX file per plan, cached in a directory only its owner
can write, each file checked against the sha256 recorded when it was written.

The ONNX Runtime and OpenVINO engines run the same dn2 backbone as the torch
engine, exported here from the torch module. The exported graph takes the
uint8 batch that PrepareImages makes, (N, 3, crop, crop), and normalises it
inside (cast, scale to [0, 1], mean/std), so an engine gets its input without a
float copy made in Python; its output is the pooled feature (N, dim) float32.

Export costs seconds (torch.export, then the ONNX rewrite), so the file is kept in the
cache with a name made from the plan: the backbone, the sha256 of its weights that the
launcher recorded (dn2ops.embed.plan), and what else shapes the graph. A worker whose
export is cached never loads the torch backbone; one that exports loads it, checks its
weights against the plan's sha256, and drops it before the engine opens the file.

The cache (cache_root) is per user: ``--cache-dir`` (EmbedConfig.cache_dir), else
``$DN2_CACHE_DIR``, else ``$XDG_CACHE_HOME/dn2``, else ``~/.cache/dn2``, resolved on the
machine that loads the model (a Dataflow worker's own disk, not the launcher's), with the
exports in ``exports/`` under it. dn2 creates its directories with mode 0700 and refuses
(CacheDirError) one that another user owns or could write, or that lies under such a
directory: another user could otherwise replace the graph that scores the images.
Each export is written under a temporary name with its record (``NAME.onnx.json``: its
sha256, size and key) and renamed into place, record first, while the process holds a
lock (``NAME.onnx.lock``); at load a file that does not match its record (truncated,
corrupt, replaced, or without a record) is logged and exported again, never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gc
import hashlib
import json
import logging
import os
import pwd
import stat
import uuid
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import TYPE_CHECKING

from dn2ops.config import EmbedConfig
from dn2ops.embed.backbones import WeightsError, load_backbone
from dn2ops.embed.plan import EmbedPlan, weights_sha256
from dn2ops.embed.preprocess import Preprocessing
from dn2ops.errors import UserError

if TYPE_CHECKING:
    from torch import nn

LOG = logging.getLogger("dn2")

# Part of the cache key: bump when the exported graph changes for the same weights.
EXPORT_VERSION = 1
# The ONNX operator set exported; ONNX Runtime and OpenVINO both read it.
OPSET = 18
EXPORTS = "exports"  # the exports' directory under the cache
RECORD = ".json"  # an export's record: PATH + RECORD
MISSING = "missing"


class CacheDirError(UserError, PermissionError):
    """The cache directory (or one above it) is owned or writable by another user."""


def cache_root(cache_dir: str | None = None) -> str:
    """dn2's cache directory on this machine: ``cache_dir`` (--cache-dir), else
    $DN2_CACHE_DIR, else $XDG_CACHE_HOME/dn2 (an absolute XDG_CACHE_HOME, as the XDG
    spec says), else ~/.cache/dn2. Read where the model loads, as the engine ``auto`` is:
    the launching machine's environment and home are not the workers'."""
    env = os.environ
    if cache_dir or env.get("DN2_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(cache_dir or env["DN2_CACHE_DIR"]))
    xdg = env.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dn2")


def export_dir(cache_dir: str | None = None) -> str:
    """The exports' directory of the cache (cache_root), created private or checked:
    its real path. Raises CacheDirError."""
    return private_dir(os.path.join(private_dir(cache_root(cache_dir)), EXPORTS))


def private_dir(path: str) -> str:
    """``path``, created with mode 0700 if missing (and so any directory above it that
    is missing), then checked: it and every directory above it are owned by this user or
    root, and none is writable by group or others (a sticky one, as /tmp, excepted above
    it). Returns its real path, which the caller uses from then on (a symlink could
    change). Raises CacheDirError naming the directory, its owner and mode, and what to do."""
    missing = [os.path.abspath(path)]
    while not os.path.lexists(missing[-1]):
        missing.append(os.path.dirname(missing[-1]))
    for d in reversed(missing[:-1]):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
            os.chmod(d, 0o700)  # the umask could have taken the owner's bits
    real = os.path.realpath(path)
    _check_owned(real, own=True)
    parent = os.path.dirname(real)
    while parent != os.path.dirname(parent):
        _check_owned(parent, own=False)
        parent = os.path.dirname(parent)
    return real


def _check_owned(path: str, *, own: bool) -> None:
    st = os.stat(path)
    if own and not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"the dn2 cache directory {path} is not a directory; point "
                            "--cache-dir (or DN2_CACHE_DIR) at a directory of your own")
    me = os.geteuid()
    owner_ok = st.st_uid == me or (not own and st.st_uid == 0)
    shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if owner_ok and not (shared and (own or not st.st_mode & stat.S_ISVTX)):
        return
    what = "the dn2 cache directory" if own else "a directory above the dn2 cache"
    why = (f"owned by {_user(st.st_uid)}, not by {_user(me)} who runs dn2" if not owner_ok
           else "writable by other users")
    fix = (f"chmod go-w {path}" if owner_ok
           else "remove it (dn2 creates its own with mode 0700)" if own else "")
    raise CacheDirError(
        f"{what} {path} is {why} (mode {stat.S_IMODE(st.st_mode):04o}): another user could "
        f"replace the models dn2 runs; {fix + ', or ' if fix else ''}point --cache-dir "
        f"(or DN2_CACHE_DIR) at a directory of your own")


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def export_key(backbone: str, weights_hash: str, preprocessing: Preprocessing) -> dict:
    """What names an export: the weights' sha256 and everything else that shapes the graph."""
    return {"backbone": backbone, "weights_sha256": weights_hash,
            "preprocessing": preprocessing.to_dict(), "export_version": EXPORT_VERSION,
            "opset": OPSET, "torch": metadata.version("torch")}  # torch not imported


def export_name(key: dict) -> str:
    """The export's file name: the backbone and 24 hex digits of the key's sha256."""
    text = (f"{key['backbone']};{key['weights_sha256']};{key['preprocessing']};"
            f"v{key['export_version']};opset{key['opset']};torch{key['torch']}")
    return f"{key['backbone']}-{hashlib.sha256(text.encode()).hexdigest()[:24]}.onnx"


def exported_model(plan: EmbedPlan) -> str:
    """The path of ``plan``'s backbone exported to ONNX (uint8 input, see the module
    docstring) in the cache of ``plan.config.cache_dir``, checked against its record.
    The torch backbone is loaded only when the cache holds no good export."""
    return cached_export(export_dir(plan.config.cache_dir), plan.backbone,
                         plan.weights_sha256, plan.preprocessing,
                         functools.partial(load_backbone, plan.backbone, plan.config.weights))


def export_backbone(backbone: str, weights: str | None = None,
                    cache_dir: str | None = None) -> str:
    """exported_model of backbone ``backbone`` with ``weights`` (warms a cache: the image
    build, benchmarks)."""
    return exported_model(EmbedPlan.resolve(
        EmbedConfig(backbone=backbone, weights=weights, cache_dir=cache_dir)))


def cached_export(directory: str, backbone: str, weights_hash: str,
                  preprocessing: Preprocessing, load: Callable[[], nn.Module]) -> str:
    """The path of the export in ``directory`` (a private_dir) of the backbone whose
    weights hash to ``weights_hash``: the cached file if it matches its record, else
    ``load()``'s module exported there. One process of this user at a time checks or
    makes a given export (a lock file beside it): the others of a machine wait for it,
    then find it made, rather than each export at once. Raises WeightsError when the
    loaded weights are not those (the weights file changed since the plan was made)."""
    key = export_key(backbone, weights_hash, preprocessing)
    path = os.path.join(directory, export_name(key))
    with _locked(path + ".lock"):
        problem = check_export(path, key)
        if problem is None:
            LOG.info("engine model: cached export %s (sha256 checked)", path)
            return path
        if problem != MISSING:
            LOG.warning("engine model: the cached export %s %s; exporting it again", path,
                        problem)
        model = load()
        got = weights_sha256(model)
        if got != weights_hash:
            raise WeightsError(
                f"the weights of {backbone} loaded here (sha256 {got[:16]}...) are not those "
                f"the job was planned with ({weights_hash[:16]}...): the weights file "
                "changed since the job was launched; launch it again")
        LOG.info("engine model: exporting %s to %s (once per machine)", backbone, path)
        from dn2ops.embed.exporter import Normalized

        write_export(Normalized(model, preprocessing).eval(), preprocessing.crop, path, key)
        del model  # the engine opens the file next: not beside the torch module
        gc.collect()
        return path


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock (flock) on ``path``, a private file created if missing."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_export(path: str, key: dict) -> str | None:
    """None when the file at ``path`` is the one its record describes (sha256, size, the
    export ``key``); else why not (MISSING: no file)."""
    if not os.path.exists(path):
        return MISSING
    try:
        with open(path + RECORD, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return "has no sha256 record"
    except (OSError, ValueError) as e:
        return f"has an unreadable record ({e})"
    if not isinstance(record, dict) or record.get("key") != key:
        return "has a record of another export"
    size = os.path.getsize(path)
    if size != record.get("size"):
        return f"is {size} bytes, not the {record.get('size')} recorded (truncated or replaced)"
    if file_sha256(path) != record.get("sha256"):
        return "does not match the sha256 recorded when it was written (changed or corrupt)"
    return None


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_export(module: nn.Module, crop: int, path: str, key: dict) -> None:
    """Exports ``module`` to ``path`` with its record, each written under a temporary
    name and renamed into place, the record first: a crash leaves no file without its
    record (at worst a record without a file, a plain cache miss)."""
    from dn2ops.embed import exporter  # torch: only a process that exports imports it

    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        exporter.to_onnx(module, crop, tmp, OPSET)
        record = {"sha256": file_sha256(tmp), "size": os.path.getsize(tmp), "key": key}
        write_atomic(path + RECORD, json.dumps(record, indent=1).encode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to a new private temporary file beside ``path``, then renames it."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
