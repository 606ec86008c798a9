"""dn2ops.io.outputs: the commit protocol on local disk and on real S3 and GCS servers.

A commit is killed at each of its store operations in turn; at every point a reader sees
either the previous commit, whole, or an uncommitted directory (never a mix), and the
next run's commit replaces it and leaves nothing staged behind.
"""

from __future__ import annotations

import json

import pytest

from dn2ops.io import features, outputs


class Killed(BaseException):
    """The process dies here (BaseException: no `except Exception` swallows it)."""


def _stage(directory: str, tables: dict[str, bytes]) -> str:
    staging = outputs.new_staging(directory)
    fs, path = outputs.fs_and_path(staging)
    fs.makedirs(path, exist_ok=True)  # local disk only: object stores have no directories
    for name, data in tables.items():
        fs.pipe_file(outputs.join(path, name), data)
    return staging


def _version(tag: str, n: int = 2) -> dict[str, bytes]:
    """n shards and a summary of one run, each naming the run."""
    files = {f"anomalies-{i:05d}-of-{n:05d}.parquet": f"{tag} shard {i}".encode()
             for i in range(n)}
    return {**files, "summary.json": json.dumps({"run": tag}).encode()}


def _what_readers_see(directory: str) -> dict[str, bytes] | None:
    """The committed files and their bytes, as a reader takes them; None if uncommitted."""
    try:
        names = outputs.committed_files(directory)
    except outputs.OutputError:
        return None
    fs, path = outputs.fs_and_path(directory)
    return {n: fs.cat_file(outputs.join(path, n)) for n in names}


def _leftovers(directory: str) -> list[str]:
    fs, path = outputs.fresh_fs_and_path(directory)
    return sorted(p for p in fs.find(path) if outputs.STAGING_PREFIX in p
                  or p.endswith(outputs.COMMITTING) or "beam-temp-" in p)


def _operations(fs, counter: list[int], die_at: int | None, mp: pytest.MonkeyPatch) -> None:
    """Counts the store operations of ``fs``; the one numbered die_at kills the process."""
    for name in ("pipe_file", "rm", "copy", "mv"):
        real = getattr(fs, name)

        def op(*args, _real=real, _name=name, **kwargs):
            if counter[0] == die_at:
                raise Killed(f"killed at operation {die_at} ({_name})")
            counter[0] += 1
            return _real(*args, **kwargs)

        mp.setattr(fs, name, op)


def check_every_crash_point(root: str) -> int:
    """Kills a replacing commit at each store operation; returns how many there were."""
    fs, _ = outputs.fs_and_path(root)
    count = [0]
    with pytest.MonkeyPatch.context() as mp:  # a whole commit, counted
        out = outputs.join(root, "count")
        outputs.commit(_stage(out, _version("v1")), out, {"kind": "results"})
        staging = _stage(out, _version("v2", n=3))
        _operations(fs, count, None, mp)
        outputs.commit(staging, out, {"kind": "results"})
    total = count[0]
    assert total >= 9  # _COMMITTING, _SUCCESS, 4 old files, 4 new files, ...
    for die_at in range(total):
        out = outputs.join(root, f"die-at-{die_at}")
        old, new = _version("v1"), _version("v2", n=3)
        outputs.commit(_stage(out, old), out, {"kind": "results"})
        staging = _stage(out, new)
        outputs.check_writable(out, "results")
        with pytest.MonkeyPatch.context() as mp, pytest.raises(Killed):
            _operations(fs, [0], die_at, mp)
            outputs.commit(staging, out, {"kind": "results"})
        seen = _what_readers_see(out)
        assert seen in (old, None, new), (die_at, seen)
        outputs.check_writable(out, "results")  # the next run may write here ...
        newest = _version("v3", n=1)
        outputs.commit(_stage(out, newest), out, {"kind": "results"})  # ... and replaces
        assert _what_readers_see(out) == newest, die_at
        assert _leftovers(out) == [], die_at
        assert features.shard_paths(out, "anomalies") == [
            outputs.join(out, "anomalies-00000-of-00001.parquet")]
    return total


def test_commit_holds_at_every_step_on_local_disk(tmp_path):
    check_every_crash_point(str(tmp_path))


@pytest.mark.objectstore
def test_commit_holds_at_every_step_on_an_object_store(bucket):
    check_every_crash_point(bucket)


@pytest.mark.objectstore
def test_success_lists_every_committed_object_with_its_size(bucket):
    out = outputs.join(bucket, "listed")
    tables = _version("v1", n=3)
    outputs.commit(_stage(out, tables), out, {"kind": "results", "run_id": "r1"})
    marker = outputs.read_marker(out)
    assert marker[outputs.FILES] == [{"name": n, "size": len(d)}
                                     for n, d in sorted(tables.items())]
    assert {k: marker[k] for k in ("kind", "run_id")} == {"kind": "results", "run_id": "r1"}
    fs, path = outputs.fs_and_path(out)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(path)) == sorted([*tables, "_SUCCESS"])
