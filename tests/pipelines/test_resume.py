"""Resume after a crash: ``dn2 embed`` (and ``dn2 score --input``) killed with SIGKILL once
it has sealed some pieces, then run again (pipelines.resume, dn2ops.io.pieces).

The crash is real: a ``dn2`` subprocess is killed once two seals are on disk. Each test
reruns from its own copy of that crashed output (the pieces are keyed on the input and
the configuration, not on the output's path) and compares what it commits with an
uninterrupted run's, keyed by (uri, sha256), features with numpy.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from benchmarks.datasets import write_png_store
from dn2ops.io import features, lease, outputs, pieces
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 120
# 2 images a model call: a piece is sealed every 8 images (pieces.CALLS_PER_PIECE calls)
EMBED = ["--backbone", "efficientnet_lite0", "--batch-size", "2"]


def dn2(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


def _digits(n: int, offset: int = 0) -> np.ndarray:
    """n real 8x8 handwritten digits (scikit-learn), as 32x32 uint8 images."""
    images = load_digits().images[offset:offset + n]
    return (np.kron(images, np.ones((4, 4))) * (255 / 16)).round().astype(np.uint8)


def seals(output: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(f"{output}/_staging-*/{pieces.PIECES}/*.json"))


def sealed_inputs(output: Path) -> list[tuple[str, str]]:
    return [tuple(i) for s in seals(output) for i in json.loads(s.read_text())["inputs"]]


def kill_after_seals(argv: list[str], output: Path, log: Path, n: int = 2) -> int:
    """Runs dn2 ARGV in a subprocess and SIGKILLs it once ``n`` pieces are sealed in
    OUTPUT; returns its exit status (-9: killed)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)
        start = time.monotonic()
        try:
            while proc.poll() is None and time.monotonic() - start < 300:
                if len(seals(output)) >= n:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
        finally:
            if proc.poll() is None and len(seals(output)) < n:
                proc.kill()
            proc.wait()
    return proc.returncode


def rows(directory: Path) -> dict[tuple[str, str], np.ndarray]:
    """{(uri, sha256): embedding} of a committed features directory."""
    table = features.read_table(str(directory), "features", columns=["uri", "sha256"])
    X = np.concatenate([x for _, x in features.iter_feature_shards(str(directory))])
    keys = list(zip(table.column("uri").to_pylist(), table.column("sha256").to_pylist(),
                    strict=True))
    assert len(set(keys)) == len(keys)
    return dict(zip(keys, X, strict=True))


def assert_same(got: Path, want: Path) -> None:
    a, b = rows(got), rows(want)
    assert sorted(a) == sorted(b)
    np.testing.assert_array_equal(np.stack([a[k] for k in sorted(b)]),
                                  np.stack([b[k] for k in sorted(b)]))


def resumed_line(caplog) -> str | None:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed ")]
    return lines[-1] if lines else None


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """(store, an uninterrupted run's features, a crashed run's output) of N_IMAGES."""
    root = tmp_path_factory.mktemp("resume")
    store = root / "store"
    write_png_store(_digits(N_IMAGES), [f"d{i:03d}" for i in range(N_IMAGES)], str(store))
    dn2("embed", "--input", str(store), "--output", str(root / "reference"), *EMBED)
    out = root / "crashed"
    code = kill_after_seals(["embed", "--input", str(store), "--output", str(out), *EMBED],
                            out, root / "killed.log")
    log = (root / "killed.log").read_text()
    assert code == -signal.SIGKILL, log
    assert outputs.read_marker(str(out)) is None  # nothing looks committed
    sealed = sealed_inputs(out)
    assert 0 < len(set(sealed)) < N_IMAGES, sealed
    return store, root / "reference", out


def _copy(crashed_out: Path, to: Path) -> Path:
    shutil.copytree(crashed_out, to)
    return to


def test_a_rerun_resumes_and_commits_what_an_uninterrupted_run_does(crashed, tmp_path,
                                                                    caplog):
    store, reference, out = crashed
    out = _copy(out, tmp_path / "out")
    n_pieces, sealed = len(seals(out)), set(sealed_inputs(out))
    caplog.set_level(logging.INFO, logger="dn2")
    dn2("embed", "--input", str(store), "--output", str(out), *EMBED)
    assert resumed_line(caplog) == (
        f"resumed {len(sealed)} of {N_IMAGES} images from {n_pieces} sealed pieces")
    assert_same(out, reference)
    marker = outputs.require_complete(str(out), features.KIND)
    assert (marker["count_in"], marker["embedded"], marker["errored"]) == (N_IMAGES, N_IMAGES, 0)
    # the commit deleted the crashed run's staging (its pieces adopted) and its own
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*outputs.committed_files(str(out)), outputs.MARKER])
    # the adopted rows were copied into shards of their own, the embedded rows not
    copied = features.read_table(str(out), "features-copied", columns=["uri", "sha256"])
    assert set(zip(copied.column("uri").to_pylist(), copied.column("sha256").to_pylist(),
                   strict=True)) == sealed


def test_a_rerun_resumes_whatever_the_inputs_spelling(crashed, tmp_path, caplog,
                                                      monkeypatch):
    """The crashed run named its input by an absolute path; a rerun that names the same
    folder relatively, with a trailing slash, adopts its pieces all the same."""
    store, reference, out = crashed
    out = _copy(out, tmp_path / "out")
    n_pieces, sealed = len(seals(out)), set(sealed_inputs(out))
    monkeypatch.chdir(store.parent)
    caplog.set_level(logging.INFO, logger="dn2")
    dn2("embed", "--input", f"{store.name}/", "--output", str(out), *EMBED)
    assert resumed_line(caplog) == (
        f"resumed {len(sealed)} of {N_IMAGES} images from {n_pieces} sealed pieces")
    assert_same(out, reference)


def test_a_changed_image_is_embedded_again_and_a_removed_one_dropped(crashed, tmp_path,
                                                                      caplog):
    store, _, out = crashed
    out = _copy(out, tmp_path / "out")
    n_pieces, sealed = len(seals(out)), sorted(set(sealed_inputs(out)))
    changed, removed = Path(sealed[0][0]), Path(sealed[1][0])
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy2(changed, backup / changed.name)
    shutil.move(removed, backup / removed.name)
    try:
        write_png_store(_digits(1, offset=500), [changed.stem], str(store))  # new pixels
        dn2("embed", "--input", str(store), "--output", str(tmp_path / "reference"), *EMBED)
        caplog.set_level(logging.INFO, logger="dn2")
        dn2("embed", "--input", str(store), "--output", str(out), *EMBED)
    finally:
        shutil.copy2(backup / changed.name, changed)
        shutil.copy2(backup / removed.name, removed)
    assert resumed_line(caplog) == (
        f"resumed {len(sealed) - 2} of {N_IMAGES - 1} images from {n_pieces} sealed pieces")
    assert_same(out, tmp_path / "reference")
    uris = {u for u, _ in rows(out)}
    assert str(removed) not in uris and str(changed) in uris
    assert (str(changed), sealed[0][1]) not in rows(out)  # the old bytes' row is gone


def test_a_tampered_piece_is_not_used(crashed, tmp_path, caplog):
    store, reference, out = crashed
    out = _copy(out, tmp_path / "out")
    found = seals(out)
    record = json.loads(found[0].read_text())
    piece = found[0].parent / record["piece"]
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the embeddings
    piece.write_bytes(bytes(data))
    kept = {tuple(i) for s in found[1:] for i in json.loads(s.read_text())["inputs"]}
    caplog.set_level(logging.INFO, logger="dn2")
    dn2("embed", "--input", str(store), "--output", str(out), *EMBED)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(found[0].name in w and "checksum mismatch" in w and
               "its images are embedded again" in w for w in warned), warned
    assert resumed_line(caplog) == (
        f"resumed {len(kept)} of {N_IMAGES} images from {len(found) - 1} sealed pieces")
    assert_same(out, reference)


def test_a_planted_piece_with_a_matching_seal_is_not_used(crashed, tmp_path, caplog):
    """Someone who can write the output (a shared bucket) replaces a piece's features and
    fixes its seal's checksum to match; without the user's resume key the seal's mac
    cannot follow, so the piece is not trusted and its images are embedded again."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    store, reference, out = crashed
    out = _copy(out, tmp_path / "out")
    found = seals(out)
    record = json.loads(found[0].read_text())
    piece = found[0].parent / record["piece"]
    table = pq.read_table(piece)
    planted = table.set_column(table.schema.get_field_index("embedding"), "embedding",
                               pa.array([[0.0] * len(e) for e in
                                         table.column("embedding").to_pylist()],
                                        type=table.schema.field("embedding").type))
    pq.write_table(planted, piece)
    record["sha256"] = hashlib.sha256(piece.read_bytes()).hexdigest()
    found[0].write_text(json.dumps(record))
    caplog.set_level(logging.INFO, logger="dn2")
    dn2("embed", "--input", str(store), "--output", str(out), *EMBED)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(found[0].name in w and "not signed with this user's resume key" in w
               for w in warned), warned
    assert_same(out, reference)


def test_the_resume_key_is_the_users_alone(tmp_path):
    from dn2ops.embed.export import CacheDirError
    from pipelines.resume import RESUME_KEY, secret

    key = secret(str(tmp_path / "cache"))
    path = tmp_path / "cache" / RESUME_KEY
    assert len(key) == 32 and secret(str(tmp_path / "cache")) == key  # made once, kept
    assert path.stat().st_mode & 0o777 == 0o600
    assert secret(str(tmp_path / "other")) != key
    path.chmod(0o644)
    with pytest.raises(CacheDirError, match="readable by nobody else"):
        secret(str(tmp_path / "cache"))


def test_another_configuration_starts_clean(crashed, tmp_path, caplog):
    store, _, out = crashed
    out = _copy(out, tmp_path / "out")
    (crashed_staging,) = {s.parent.parent.name for s in seals(out)}
    caplog.set_level(logging.INFO, logger="dn2")
    dn2("embed", "--input", str(store), "--output", str(out), *EMBED, "--decode", "full")
    said = [r.getMessage() for r in caplog.records]
    assert f"{crashed_staging} holds sealed pieces of another input or configuration: not " \
           "resumed (this run's commit deletes them)" in said
    assert resumed_line(caplog) is None and not any("found " in s for s in said)
    marker = outputs.require_complete(str(out), features.KIND)
    assert (marker["embedded"], marker["decode"]) == (N_IMAGES, "full")
    assert not list(out.glob("_staging-*"))


def test_a_commit_leaves_a_live_runs_staging_alone(crashed, tmp_path, caplog):
    """A staging folder whose own lease names a live run (this process) is neither
    adopted nor deleted by the commit; the crashed run's is adopted and deleted."""
    store, reference, out = crashed
    out = _copy(out, tmp_path / "out")
    (crashed_staging,) = {s.parent.parent for s in seals(out)}
    n_pieces, sealed = len(seals(out)), set(sealed_inputs(out))
    live = out / f"{crashed_staging.name.rsplit('-', 1)[0]}-0123456789ab"  # the same key
    shutil.copytree(crashed_staging / pieces.PIECES, live / pieces.PIECES)
    held = sorted(os.listdir(live / pieces.PIECES))
    caplog.set_level(logging.INFO, logger="dn2")
    with lease.hold(str(live), live.name):  # renewed by this process while the run runs
        dn2("embed", "--input", str(store), "--output", str(out), *EMBED)
        assert sorted(p.name for p in live.iterdir()) == [pieces.PIECES, lease.LEASE]
        assert sorted(os.listdir(live / pieces.PIECES)) == held
    said = [r.getMessage() for r in caplog.records]
    assert any(s.startswith(f"not resuming from {live.name}: its run still runs") for s in said)
    assert any(s.startswith(f"leaving {live.name} alone: its run still runs") for s in said)
    assert not crashed_staging.exists()  # a gone run's: adopted, then deleted by the commit
    assert resumed_line(caplog) == (
        f"resumed {len(sealed)} of {N_IMAGES} images from {n_pieces} sealed pieces")
    assert_same(out, reference)


def test_score_input_resumes(crashed, tmp_path, caplog):
    """dn2 score --input seals and resumes as dn2 embed does: the same scores as an
    uninterrupted run's."""
    store, reference, _ = crashed
    index = tmp_path / "index"
    dn2("build-index", "--features", str(reference), "--output", str(index), "--no-clean")
    argv = ["score", "--input", str(store), "--index", str(index), *EMBED]
    dn2(*argv, "--output", str(tmp_path / "whole"))
    out = tmp_path / "results"
    code = kill_after_seals([*argv, "--output", str(out)], out, tmp_path / "killed.log")
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    sealed = set(sealed_inputs(out))
    caplog.set_level(logging.INFO, logger="dn2")
    dn2(*argv, "--output", str(out))
    assert resumed_line(caplog).startswith(f"resumed {len(sealed)} of {N_IMAGES} images")

    def scores(d: Path) -> dict[str, float]:
        t = features.read_table(str(d), "anomalies", columns=["uri", "score", "rank"])
        return {r["uri"]: (r["score"], r["rank"]) for r in t.to_pylist()}

    assert scores(out) == scores(tmp_path / "whole")
