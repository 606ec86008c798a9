"""Two dn2 runs into one output, on local disk, S3 (moto) and GCS (fake-gcs-server).

The interleaving is forced: run A (in this process) is held at its commit, holding the
output's lease, while run B (another process, as a scheduler would start it) tries the
same output. Then a run whose lease is taken over before its commit stops without
committing. Each time the committed output is checked whole.
"""

from __future__ import annotations

import os
import posixpath
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.datasets import write_png_store
from dn2ops.io import features, lease, outputs, pieces
from pipelines import finalize
from pipelines.cli import main
from tests.conftest import digit_images, new_bucket
from tests.pipelines.test_finalize import _results, _stage_results

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 6


@pytest.fixture(scope="module", params=["local", pytest.param("s3", marks=pytest.mark.objectstore),
                                        pytest.param("gs", marks=pytest.mark.objectstore)])
def place(request, tmp_path_factory):
    """(store of N_IMAGES images, output root) on local disk or a new bucket, with the
    environment pointing every client at the bucket's server for the module."""
    local = tmp_path_factory.mktemp("lease-store")
    normal, _, _ = digit_images(n_normal=N_IMAGES)
    write_png_store(normal, [f"n{i:03d}" for i in range(N_IMAGES)], str(local / "images"))
    if request.param == "local":
        yield str(local / "images"), str(local / "out")
        return
    with new_bucket(request, request.param) as bucket:
        fs, path = outputs.fs_and_path(bucket)
        fs.put(str(local / "images"), f"{path}/images", recursive=True)
        yield f"{bucket}/images", f"{bucket}/out"


def _check_whole(output: str, run: str, failed: bool = False) -> dict:
    """The committed features directory of run ``run``: every image, nothing else (with
    ``failed``: but the sealed pieces a failed run keeps for its rerun, dn2ops.io.pieces)."""
    marker = outputs.require_complete(output, features.KIND)
    assert marker["run_id"] == run
    assert marker["count_in"] == N_IMAGES == marker["embedded"] + marker["errored"]
    assert marker["errored"] == 0
    fs, path = outputs.fresh_fs_and_path(output)
    present = sorted(posixpath.relpath(p, path) for p in fs.find(path))
    kept = [p for p in present if p.startswith(outputs.STAGING_PREFIX)]
    assert all(p.split("/")[1] == pieces.PIECES for p in kept) and (bool(kept) == failed)
    assert sorted(set(present) - set(kept)) == sorted(
        [*outputs.committed_files(output), outputs.MARKER])  # no lease
    uris = features.read_table(output, "features", columns=["uri"]).column("uri").to_pylist()
    assert sorted(posixpath.basename(u) for u in uris) == [
        f"n{i:03d}.png" for i in range(N_IMAGES)]
    return marker


def test_two_runs_into_one_output(place, monkeypatch, capsys):
    store, out = place
    output = f"{out}/features"
    argv = ["embed", "--input", store, "--output", output]
    real_commit, seen = outputs.commit, {}

    def b_starts_while_a_commits(staging, directory, marker):
        if directory == output and "b" not in seen:  # A holds the lease, here
            seen["a"] = posixpath.basename(staging)
            t0 = time.monotonic()
            seen["b"] = subprocess.run([sys.executable, "-m", "tests.objectstores", *argv],
                                       cwd=REPO, capture_output=True, text=True, timeout=600)
            seen["b_seconds"] = time.monotonic() - t0
        return real_commit(staging, directory, marker)

    monkeypatch.setattr(outputs, "commit", b_starts_while_a_commits)
    assert main(argv) == 0  # run A
    b = seen["b"]
    said = [line for line in b.stderr.splitlines() if line.startswith("dn2 embed: error")]
    said_b = (f"{out}: A ({seen['a']}) committed; B exited {b.returncode} after "
              f"{seen['b_seconds']:.1f} s: {said}")
    assert b.returncode == 1, b.stderr[-3000:]
    assert said and said[0].startswith(
        f"dn2 embed: error: output {output} is being written by another dn2 run: run "
        f"{seen['a']} on host {lease.this_host()} (pid {os.getpid()}), lease valid until ")
    assert "Traceback" not in b.stderr
    first = _check_whole(output, seen["a"])

    # Run C loses the lease before it commits (another run took it over): no commit.
    def intruder_before_c_commits(staging, directory, marker):
        if directory == output:
            held = lease.Lease(output, "reader")
            _, token = held.store.read(held.path)
            intruder = lease.Record("run-intruder", "elsewhere", 1, time.time() + 600)
            seen["intruder"] = held.store.replace(held.path, intruder.encode(), token)
        return real_commit(staging, directory, marker)

    monkeypatch.setattr(outputs, "commit", intruder_before_c_commits)
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    print(f"{said_b}\n{out}: C said: {err.splitlines()[-1]}")
    assert err.splitlines()[-1].startswith(
        "dn2 embed: error: this run (_staging-") and (
        f"no longer holds the lease on {output}: it is now held by run run-intruder on host "
        "elsewhere (pid 1)") in err
    assert "it stops without committing" in err
    # The intruder's lease stays; the output is A's commit, whole.
    held = lease.Lease(output, "reader")
    assert held.store.read(held.path)[1] == seen["intruder"]
    held.store.delete(held.path, seen["intruder"])
    assert _check_whole(output, seen["a"], failed=True) == first


def test_the_last_step_takes_the_lease_or_adopts_the_jobs(tmp_path):
    """pipelines.finalize as a plain function, as Dataflow runs it: in a template job no
    process holds the lease and the step takes it; under dn2 score waiting on Dataflow it
    adopts the lease the launching process holds; another run's live lease stops it."""
    out = tmp_path / "results"
    staging = _stage_results(out)
    assert _results(staging, out, 6)["scored"] == 3  # a template job's step
    assert outputs.read_marker(str(out))["run_id"] == finalize.run_id(staging)
    assert not (out / lease.LEASE).exists()  # taken and released by the step
    other = lease.Lease(str(out), "run-other", host="elsewhere", pid=1).acquire()
    refused = _stage_results(out)
    with pytest.raises(lease.LeaseHeld, match="run run-other on host elsewhere"):
        _results(refused, out, 6)
    assert outputs.read_marker(str(out))["run_id"] == finalize.run_id(staging)
    other.release()
    # The launching process (another host) holds the run's lease while the job runs.
    adopted = _stage_results(out)
    job = lease.Lease(str(out), finalize.run_id(adopted), host="launcher", pid=7).acquire()
    _results(adopted, out, 6)
    assert outputs.read_marker(str(out))["run_id"] == finalize.run_id(adopted)
    record = lease.Record.decode((out / lease.LEASE).read_bytes())
    assert record.run_id == job.run_id and record.host == lease.this_host()  # renewed here
    job.renew()  # the launcher's next renewal adopts the step's version ...
    job.release()  # ... and the launcher releases it
    assert not (out / lease.LEASE).exists()
