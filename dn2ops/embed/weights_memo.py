"""The weights' sha256, remembered in dn2's private cache so that a launcher whose weights
files have not changed does not import torch to hash them again.

The plan's ``weights_sha256`` (dn2ops.embed.plan) is a hash of the loaded state: it
takes torch's import and the backbone's load, about 2 s of a `dn2 embed` start on two
cores, and a rerun that resumes a crashed run (issue 30) or a nightly job pays it each
time. Here the hash is kept under ``weights/`` in the cache (dn2ops.embed.export's
cache_root: created 0700, refused when another user could write it), keyed by what would
change if the weights did:

- each weights file's real path, device, inode, size, mtime and ctime (ctime cannot be
  set back by a file's owner: only the clock's owner could forge it), so a file
  replaced or rewritten in place is a miss;
- the sha256 of dn2's sources that build the network and hash its state (the module
  names are part of the hash), and the versions of torch and torchvision (whose ResNets
  name the modules of a user's weights).

Weights that are not local files (an fsspec URI) or random weights are hashed each time.
A miss loads and hashes as before, and the memo is written only after the weights
loaded and fitted, so a hit is a file that was checked. Nothing here is trusted that
another user could write: the directory is private, as the exports' is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata

from dn2ops.config import EmbedConfig
from dn2ops.embed import backbones, plan
from dn2ops.embed.backbones import COMPOSITE_SEP, RANDOM_WEIGHTS, BackboneSpec
from dn2ops.embed.export import cache_root, file_sha256, private_dir, write_atomic

LOG = logging.getLogger("dn2")
MEMO_DIR = "weights"
MEMO_VERSION = 1
# The sources whose change could change the hash of the same weights file.
# (efficientnet_lite by path: importing it imports torch.)
_SOURCES = (backbones.__file__, plan.__file__, __file__,
            os.path.join(os.path.dirname(__file__), "efficientnet_lite.py"))


def weights_sha256(spec: BackboneSpec, config: EmbedConfig) -> str:
    """The sha256 that EmbedPlan.resolve would compute for ``config``'s weights, from the
    memo when every weights file is the one hashed before."""
    key = _key(spec, config.weights)
    path = None
    if key is not None:
        try:
            directory = private_dir(os.path.join(private_dir(cache_root(config.cache_dir)),
                                                 MEMO_DIR))
        except OSError as e:  # CacheDirError (the engines refuse it too), or a --cache-dir
            # meant for the workers that this launcher cannot create: hashing needs no cache
            LOG.debug("weights not memoised: %s", e)
        else:
            name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
            path = os.path.join(directory, name + ".json")
            found = _read(path, key)
            if found:
                return found
    digest = plan.weights_sha256(backbones.load_backbone(spec.name, config.weights))
    if path is not None:
        try:
            write_atomic(path, json.dumps({"key": key, "weights_sha256": digest}).encode())
        except OSError as e:  # a full disk: the next run hashes again
            LOG.debug("weights not memoised: %s", e)
    return digest


def _key(spec: BackboneSpec, weights: str | None) -> dict | None:
    if weights == RANDOM_WEIGHTS:
        return None
    files = []
    for uri in backbones.resolve_weights(spec, weights).split(COMPOSITE_SEP):
        local = uri.removeprefix("file://")
        if "://" in local or not os.path.isfile(local):
            return None  # remote, or missing: the load says why
        real = os.path.realpath(local)
        st = os.stat(real)
        files.append([real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                      st.st_ctime_ns])
    return {"version": MEMO_VERSION, "backbone": spec.name, "files": files,
            "torch": _version("torch"), "torchvision": _version("torchvision"),
            "sources": [file_sha256(p) for p in _SOURCES]}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _read(path: str, key: dict) -> str | None:
    try:
        with open(path, "rb") as f:
            memo = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(memo, dict) or memo.get("key") != key:
        return None
    digest = memo.get("weights_sha256")
    return digest if isinstance(digest, str) and len(digest) == 64 else None

