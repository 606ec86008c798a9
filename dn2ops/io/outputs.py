"""Output directories that readers can trust on any store: staged, then committed.

Every dn2 output directory (features, index, results) is written into a staging
prefix beside it, ``DIR/_staging-RUNID/``, and committed only when the run has
succeeded. The protocol asks of the store only what object stores give: whole-object
writes, copies, deletes and listings; no directories, no atomic rename.

Only the run that holds the directory's lease (``_LEASE``, dn2ops.io.lease) commits
into it. commit() does, in order:

0. check that this run still holds the lease, renewing it (lease.fence): a run whose
   lease was taken over stops here and changes nothing;
1. write ``_COMMITTING`` (the kind and run id): the directory is being replaced;
2. delete ``_SUCCESS``: from here on readers see an uncommitted directory;
3. delete everything else in DIR but this run's staging prefix, the lease and the
   staging of another run that still runs (its staging folder's own ``_LEASE`` is live:
   dn2ops.io.pieces): old tables, the ``_staging-*`` of a run that died (and the sealed
   pieces a rerun adopted from it), files half-copied by a commit that died;
4. copy each staged file to its final name (a rename on local disk, which has one);
5. check the lease again (lease.fence), then write ``_SUCCESS`` last, listing every
   committed file (name, size) under ``committed_files``: the one commit point;
6. delete the staging prefix (but its ``_LEASE``, which the run's own process
   releases), then ``_COMMITTING``.

A crash before 2 leaves the previous commit readable; between 2 and 5 an uncommitted
directory that the next run of the same kind cleans up and replaces (``_COMMITTING``
says whose it is); after 5 a committed directory with leftovers the next commit
deletes. Readers take the file list from ``_SUCCESS`` (committed_files), never from a
listing, so a stray or uncommitted shard is never read.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dn2ops.errors import UserError
from dn2ops.io import lease

MARKER = "_SUCCESS"
# Written first by commit() and removed last: a directory holding it (and no
# MARKER) was being replaced when its run stopped, so a rerun may overwrite it.
COMMITTING = "_COMMITTING"
STAGING_PREFIX = "_staging-"
# The marker key listing the committed files: [{"name": relative path, "size": bytes}].
FILES = "committed_files"
# Beam's file sinks write into beam-temp-* beside their shards and delete it when done;
# hidden names (the sealed pieces, dn2ops.io.pieces) and the staging's own lease are not
# output either.
_NOT_STAGED = ("beam-temp-", ".", lease.LEASE)

LOG = logging.getLogger("dn2")


class OutputError(UserError, ValueError):
    """An output path holds something else, or an input directory is incomplete."""


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(uri)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts)


def fresh_fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fs_and_path with the filesystem's cached listings of ``uri`` dropped.

    s3fs and gcsfs cache listings; Beam's writers, other processes and other runs change
    the store behind them, so every check of what an output holds asks the store.
    """
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)
    return fs, path


def read_marker(directory: str, name: str = MARKER) -> dict[str, Any] | None:
    fs, path = fs_and_path(directory)
    marker = join(path, name)
    fs.invalidate_cache(marker)
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
    """Refuses to write ``kind`` into a directory that holds other data, or that another
    live run holds the lease of (lease.LeaseHeld)."""
    fs, path = fresh_fs_and_path(directory)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise OutputError(f"output path {directory} is a file, not a directory")
    lease.check_free(directory)
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
                  if not is_bookkeeping(posixpath.basename(p.rstrip("/")))]
        if others:
            raise OutputError(
                f"output path {directory} is not empty and holds no dn2 {kind} output "
                f"(found {posixpath.basename(others[0])!r}...); refusing to overwrite")


def require_complete(directory: str, kind: str) -> dict[str, Any]:
    """The marker of a committed ``kind`` directory, or a clear error."""
    fs, path = fresh_fs_and_path(directory)
    if not fs.exists(path):
        raise OutputError(f"{kind} directory {directory} does not exist")
    marker = read_marker(directory)
    if marker is None:
        raise OutputError(f"{directory} has no {MARKER} marker: it is not a complete dn2 "
                          f"{kind} directory (a run stopped mid-way?); run it again")
    if marker.get("kind") != kind:
        raise OutputError(f"{directory} holds dn2 {marker.get('kind')} output, not {kind}")
    return marker


def is_bookkeeping(name: str) -> bool:
    """A name in an output directory that is not output: a run's staging prefix, the
    lease (and its probes and temporary copies), a hidden file."""
    return name.startswith((STAGING_PREFIX, lease.LEASE, "."))


def new_staging(directory: str, key: str | None = None) -> str:
    """A new staging folder's name in ``directory``: ``_staging-RUN``, or with ``key``
    (what makes the run's features: dn2ops.embed.resume.resume_key)
    ``_staging-KEY-RUN``, which a rerun of the same work finds (dn2ops.io.pieces)."""
    run = uuid.uuid4().hex[:12]
    return join(directory, f"{STAGING_PREFIX}{key}-{run}" if key else f"{STAGING_PREFIX}{run}")


def is_staging(directory: str) -> bool:
    return posixpath.basename(directory.rstrip("/")).startswith(STAGING_PREFIX)


def staged_files(staging: str) -> dict[str, int]:
    """Relative name -> size of every file a run staged (Beam's temporary files left out)."""
    fs, path = fresh_fs_and_path(staging)
    if not fs.exists(path):
        return {}
    found = fs.find(path, detail=True)
    files = {}
    for full, info in found.items():
        rel = posixpath.relpath(full, path)
        if not any(part.startswith(_NOT_STAGED) for part in rel.split("/")):
            files[rel] = int(info["size"])
    return dict(sorted(files.items()))


def committed_files(directory: str) -> list[str]:
    """The files a committed directory's ``_SUCCESS`` lists (relative names, sorted).

    This is what readers read: never a listing, which could hold a stray or uncommitted
    file. A directory committed by a dn2 that kept no list (before ``committed_files``)
    is listed instead, with a warning.
    """
    marker = read_marker(directory)
    if marker is None:
        raise OutputError(f"{directory} has no {MARKER} marker: it is not a complete dn2 "
                          "directory (a run stopped mid-way?); run it again")
    if FILES in marker:
        return sorted(f["name"] for f in marker[FILES])
    LOG.warning("%s was committed by an older dn2 whose %s lists no files; reading what the "
                "directory holds (rewrite it to get the guarantee)", directory, MARKER)
    fs, path = fresh_fs_and_path(directory)
    return sorted(posixpath.relpath(p, path) for p in fs.find(path)
                  if not posixpath.basename(p).startswith(("_", ".")))


def matching(names: list[str], pattern: str) -> list[str]:
    """The top-level names that match a glob pattern (``features-*.parquet``)."""
    return [n for n in names if "/" not in n and fnmatch.fnmatchcase(n, pattern)]


def commit(staging: str, directory: str, marker: dict[str, Any]) -> None:
    """Replaces ``directory``'s outputs by the staged files; ``_SUCCESS`` (``marker`` plus
    the file list) is written last. See the module docstring for each step and crash."""
    fs, path = fresh_fs_and_path(directory)
    _, stage_path = fs_and_path(staging)
    staged = staged_files(staging)
    run = posixpath.basename(stage_path)
    lease.fence(directory)  # a run that no longer holds DIR's lease changes nothing
    fs.pipe_file(join(path, COMMITTING),
                 json.dumps({"kind": marker.get("kind"), "run_id": run}).encode())
    _clear(fs, path, keep=(run, COMMITTING))
    for rel in staged:
        _place(fs, join(stage_path, rel), join(path, rel))
    files = [{"name": rel, "size": size} for rel, size in staged.items()]
    lease.fence(directory)  # renewed: it lasts far longer than the write of _SUCCESS
    fs.pipe_file(join(path, MARKER),
                 json.dumps({**marker, FILES: files}, indent=2, default=str).encode())
    finish_commit(staging, directory)


def finish_commit(staging: str, directory: str) -> None:
    """Deletes what a commit leaves once ``_SUCCESS`` is written: staging (but its lease,
    which the process holding it releases), ``_COMMITTING``."""
    discard(staging, keep=(lease.LEASE,))
    fs, path = fs_and_path(directory)
    committing = join(path, COMMITTING)
    fs.invalidate_cache(committing)
    if fs.exists(committing):
        fs.rm(committing)


def _clear(fs: fsspec.AbstractFileSystem, path: str, keep: tuple[str, ...]) -> None:
    """Deletes ``_SUCCESS`` first, then every other entry of ``path`` not named in keep,
    but the lease (this run's, and the only live one: the commit is fenced by it) and
    the staging folder of another run that still runs (its own lease is live)."""
    if fs.exists(join(path, MARKER)):
        fs.rm(join(path, MARKER))  # from here on readers see an uncommitted directory
    for old in fs.ls(path, detail=False):
        name = posixpath.basename(old.rstrip("/"))
        if name in keep or name.startswith(lease.LEASE):
            continue
        if name.startswith(STAGING_PREFIX):
            holder = lease.live_holder(fs.unstrip_protocol(old.rstrip("/")))
            if holder is not None:
                LOG.info("leaving %s alone: its run still runs (run %s on host %s, pid "
                         "%s)", name, holder.run_id, holder.host, holder.pid)
                continue
        fs.rm(old, recursive=True)
    fs.invalidate_cache(path)


def _place(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """A staged file to its final name: renamed on local disk, copied on an object store
    (where a rename is a copy and a delete; the staged copy goes with the staging)."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        fs.mv(src, dst)
    else:
        fs.copy(src, dst)


def discard(staging: str, keep: tuple[str, ...] = ()) -> None:
    """Deletes a staging folder, but its entries whose names start with one of ``keep``
    (the folder goes too when none is left)."""
    fs, path = fresh_fs_and_path(staging)
    if not fs.exists(path):
        return
    entries = fs.ls(path, detail=False) if keep else []
    kept = [e for e in entries if posixpath.basename(e.rstrip("/")).startswith(keep)]
    if not kept:
        fs.rm(path, recursive=True)
        return
    for entry in entries:
        if entry not in kept:
            fs.rm(entry, recursive=True)
    fs.invalidate_cache(path)
