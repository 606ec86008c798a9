"""Output directories that readers can trust: staged, then committed.

Every dn2 output directory (features, index, results) is written into a
staging folder beside it and committed only when the run has succeeded: old
tables of the same kind are removed, the new ones moved in, and the marker
file (``_SUCCESS`` with the directory's kind) written last. A reader that finds
no marker knows the directory is incomplete. A rerun replaces, never appends,
also after a run that stopped mid-commit (``_COMMITTING`` names its kind).
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import fsspec

MARKER = "_SUCCESS"
# Written first by commit() and removed last: a directory holding it (and no
# MARKER) was being replaced when its run stopped, so a rerun may overwrite it.
COMMITTING = "_COMMITTING"


class OutputError(ValueError):
    """An output path holds something else, or an input directory is incomplete."""


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts)


def read_marker(directory: str, name: str = MARKER) -> dict[str, Any] | None:
    fs, path = fs_and_path(directory)
    marker = join(path, name)
    if not fs.exists(marker):
        return None
    try:
        value = json.loads(fs.cat_file(marker))
    except ValueError as e:  # storage is untrusted: a damaged marker is a clear error
        raise OutputError(f"{marker} is damaged (not JSON: {e}); rerun the step that "
                          "wrote this directory") from None
    if not isinstance(value, dict):
        raise OutputError(f"{marker} is damaged (a JSON {type(value).__name__}, not an "
                          "object); rerun the step that wrote this directory")
    return value


def check_writable(directory: str, kind: str) -> None:
    """Refuses to write ``kind`` into a directory that holds other data."""
    fs, path = fs_and_path(directory)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise OutputError(f"output path {directory} is a file, not a directory")
    marker = read_marker(directory)
    if marker is not None and marker.get("kind") != kind:
        raise OutputError(f"output path {directory} holds dn2 {marker.get('kind')} output, "
                          f"not {kind}; choose another --output")
    if marker is None:
        committing = read_marker(directory, COMMITTING)
        if committing is not None:
            if committing.get("kind") == kind:
                return  # a run of this kind stopped mid-commit: a rerun replaces its files
            raise OutputError(f"output path {directory} holds an interrupted dn2 "
                              f"{committing.get('kind')} output, not {kind}; choose another "
                              "--output")
        others = [p for p in fs.ls(path, detail=False)
                  if not posixpath.basename(p).startswith(("_staging-", "."))]
        if others:
            raise OutputError(
                f"output path {directory} is not empty and holds no dn2 {kind} output "
                f"(found {posixpath.basename(others[0])!r}...); refusing to overwrite")


def require_complete(directory: str, kind: str) -> dict[str, Any]:
    """The marker of a committed ``kind`` directory, or a clear error."""
    fs, path = fs_and_path(directory)
    if not fs.exists(path):
        raise OutputError(f"{kind} directory {directory} does not exist")
    marker = read_marker(directory)
    if marker is None:
        raise OutputError(f"{directory} has no {MARKER} marker: it is not a complete dn2 "
                          f"{kind} directory (a run stopped mid-way?); run it again")
    if marker.get("kind") != kind:
        raise OutputError(f"{directory} holds dn2 {marker.get('kind')} output, not {kind}")
    return marker


def new_staging(directory: str) -> str:
    return join(directory, f"_staging-{uuid.uuid4().hex[:12]}")


def commit(staging: str, directory: str, marker: dict[str, Any]) -> None:
    """Moves every file of ``staging`` into ``directory``, replacing the old outputs."""
    fs, path = fs_and_path(directory)
    _, stage_path = fs_and_path(staging)
    # Says whose files these are should the run stop before the new MARKER lands.
    fs.pipe_file(join(path, COMMITTING), json.dumps({"kind": marker.get("kind")}).encode())
    if fs.exists(join(path, MARKER)):
        fs.rm(join(path, MARKER))  # from here on readers see an incomplete directory
    for old in fs.ls(path, detail=False):
        name = posixpath.basename(old)
        if name not in (posixpath.basename(stage_path), COMMITTING) and not name.startswith("."):
            fs.rm(old, recursive=True)
    for new in fs.find(stage_path):
        rel = posixpath.relpath(new, stage_path)
        target = join(path, rel)
        fs.makedirs(posixpath.dirname(target), exist_ok=True)
        fs.mv(new, target)
    fs.rm(stage_path, recursive=True)
    fs.pipe_file(join(path, MARKER), json.dumps(marker, indent=2, default=str).encode())
    fs.rm(join(path, COMMITTING))


def discard(staging: str) -> None:
    fs, path = fs_and_path(staging)
    if fs.exists(path):
        fs.rm(path, recursive=True)
