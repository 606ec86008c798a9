"""Every dn2 command with every input and output on a real S3 (moto) or GCS
(fake-gcs-server) server on 127.0.0.1, against the same commands on local disk.

fsspec (s3fs, gcsfs) lists and reads the images, the manifest, the indexes and the
committed tables; Beam's own S3 and GCS filesystems write the Parquet shards (and
rename them into place) and read feature shards back in ``dn2 score --features``.
"""

from __future__ import annotations

import json
import posixpath
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dn2ops.index import LoadedIndex
from dn2ops.io import features, lease, outputs
from pipelines.cli import main
from tests.pipelines.test_reliability import kill_when_staged

pytestmark = pytest.mark.objectstore

RESULTS = {"run/results": "anomalies", "ivf-results": "anomalies",
           "kmeans-results": "anomalies", "groups": "groups"}
# K-means centres depend on the order of the feature rows, which Beam's shuffle sets:
# checked against brute force over the store's own centres instead.
SAME_AS_LOCAL = [name for name in RESULTS if name != "kmeans-results"]


def dn2(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


def scenario(store: str, out: str) -> None:
    """The commands every store runs: inputs under ``store``, outputs under ``out``."""
    dn2("run", "--normal", f"{store}/normal", "--input", f"{store}/incoming.csv",
        "--output", f"{out}/run", "--top", "5", "--report", "--batch-size", "16")
    normal = f"{out}/run/normal_features"
    dn2("build-index", "--features", normal, "--output", f"{out}/kmeans", "--kmeans", "2")
    dn2("build-index", "--features", normal, "--output", f"{out}/ivf", "--ivf", "2",
        "--nprobe", "2")
    dn2("score", "--input", f"{store}/incoming/", "--index", f"{out}/ivf",
        "--output", f"{out}/ivf-results", "--batch-size", "16")
    dn2("score", "--features", f"{out}/run/features", "--index", f"{out}/kmeans",
        "--output", f"{out}/kmeans-results")
    dn2("score", "--features", f"{out}/run/features", "--group-by", "label",
        "--group-score", "covtrace", "--output", f"{out}/groups", "--top", "2")
    dn2("report", f"{out}/kmeans-results")


def scores(results: str, prefix: str) -> dict[str, float]:
    """{image path relative to the store, or group: score} of a committed results dir."""
    key = "uri" if prefix == "anomalies" else "group"
    table = features.read_table(results, prefix, columns=[key, "score"]).to_pylist()
    return {_relative(r[key]): r["score"] for r in table}


def _relative(uri: str) -> str:
    """incoming/i000.png of any store's .../incoming/i000.png (groups are kept as they are)."""
    return "/".join(uri.rsplit("/", 2)[-2:])


@pytest.fixture(scope="module")
def local_runs(digit_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-runs")
    t0 = time.perf_counter()
    scenario(str(digit_store), str(out))
    return str(out), time.perf_counter() - t0


@pytest.fixture(scope="module")
def store_runs(bucket, digit_store):
    """The digit store copied to the bucket, and the scenario run there: (store, out, s)."""
    fs, path = outputs.fs_and_path(bucket)
    fs.put(str(digit_store), f"{path}/store", recursive=True)
    t0 = time.perf_counter()
    scenario(f"{bucket}/store", f"{bucket}/out")
    return f"{bucket}/store", f"{bucket}/out", time.perf_counter() - t0


def test_scores_equal_the_same_commands_on_local_disk(store_runs, local_runs):
    _, out, seconds = store_runs
    local, local_seconds = local_runs
    print(f"scenario wall time: store {seconds:.1f} s, local disk {local_seconds:.1f} s")
    for name in SAME_AS_LOCAL:
        prefix = RESULTS[name]
        got, want = scores(f"{out}/{name}", prefix), scores(f"{local}/{name}", prefix)
        assert sorted(got) == sorted(want) and len(got) >= 2, name
        np.testing.assert_allclose([got[k] for k in sorted(want)],
                                   [want[k] for k in sorted(want)], rtol=1e-5, atol=1e-5,
                                   err_msg=name)


def test_kmeans_scores_equal_brute_force_over_the_stores_centres(store_runs):
    _, out, _ = store_runs
    centres = LoadedIndex(f"{out}/kmeans", device="cpu").centroids  # (2, dim)
    table, X, _ = features.load_features(f"{out}/run/features")
    # The centres are of the default feature transform's features: root4-l2, by hand.
    X = np.sqrt(np.sqrt(X.astype(np.float64)))  # pooled activations are non-negative
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    d = np.sqrt(((X[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(-1)).min(1)
    want = {_relative(u): s for u, s in zip(table.column("uri").to_pylist(), d, strict=True)}
    got = scores(f"{out}/kmeans-results", "anomalies")
    assert sorted(got) == sorted(want) and len(got) == 30
    np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)],
                               rtol=1e-5, atol=1e-5)


def test_every_input_is_accounted_for(store_runs):
    store, out, _ = store_runs
    fs, _ = outputs.fs_and_path(store)
    n_images = len(fs.glob(f"{store}/incoming/*.png"))
    for name in RESULTS:
        summary = json.loads(fs.cat_file(f"{out}/{name}/summary.json"))
        assert summary["count_in"] == n_images == summary["scored"] + summary["errored"], name


def test_manifest_uris_resolve_on_the_store(store_runs):
    store, out, _ = store_runs
    uris = features.read_table(f"{out}/run/results", "anomalies", columns=["uri"])
    assert all(u.startswith(f"{store}/incoming/i") for u in uris.column("uri").to_pylist())
    labels = features.read_table(f"{out}/run/features", "features", columns=["label"])
    assert set(labels.column("label").to_pylist()) == {"0", "1"}  # manifest column carried


def test_reports_are_written_to_the_store(store_runs):
    _, out, _ = store_runs
    fs, _ = outputs.fs_and_path(out)
    for name in ("run/results", "kmeans-results"):
        html = fs.cat_file(f"{out}/{name}/report.html").decode()
        top = features.read_table(f"{out}/{name}", "anomalies", columns=["uri", "rank"])
        first = min(top.to_pylist(), key=lambda r: r["rank"])["uri"]
        assert html.startswith("<!DOCTYPE html>") and posixpath.basename(first) in html


def test_committed_files_are_what_success_lists_and_nothing_is_left_staged(store_runs):
    _, out, _ = store_runs
    fs, path = outputs.fresh_fs_and_path(out)
    everything = fs.find(path)
    assert [p for p in everything if outputs.STAGING_PREFIX in p or "beam-temp-" in p
            or p.endswith(outputs.COMMITTING)] == []
    dirs = sorted({posixpath.dirname(p) for p in everything if p.endswith(outputs.MARKER)})
    assert len(dirs) == 9  # 4 of dn2 run, 2 indexes, 3 results
    for d in dirs:
        present = sorted(posixpath.relpath(p, d) for p in everything
                         if p.startswith(d + "/") and not p.endswith(outputs.MARKER))
        listed = outputs.committed_files(fs.unstrip_protocol(d))
        # report.html is written after its results are committed (dn2 report, --report)
        assert [p for p in present if p != "report.html"] == listed, d


def _kill_when_staged(argv: list[str], output: str, log: Path) -> dict:
    """Runs dn2 ARGV in a subprocess; SIGKILLs it once OUTPUT/_staging-* is on the store."""
    fs, path = outputs.fs_and_path(output)

    def staged() -> list[str]:
        fs.invalidate_cache(path)
        return [p for p in (fs.find(path) if fs.exists(path) else [])
                if outputs.STAGING_PREFIX in p  # the staging's own lease is written first
                and not posixpath.basename(p).startswith(lease.LEASE)]

    # tests.objectstores runs dn2's command line, made ready for fake-gcs-server
    return kill_when_staged(argv, Path(), log, module="tests.objectstores",
                            staged_files=staged)


def test_sigkill_during_score_then_rerun_then_a_second_run(store_runs, tmp_path, capsys):
    store, out, _ = store_runs
    results = f"{out}/killed"
    args = ["score", "--input", f"{store}/incoming/", "--index", f"{out}/run/index",
            "--batch-size", "8", "--output", results]
    killed = _kill_when_staged(args, results, tmp_path / "log")
    print(f"killed: {killed}")
    log = (tmp_path / "log").read_text()
    assert killed["returncode"] == -signal.SIGKILL, (killed, log)
    # What the user saw: dn2's progress, no INFO from botocore, gcsfs or faiss's loader
    # (google.auth warns, at WARNING, that there is no metadata server to ask)
    assert " dn2 engine " in log, log  # the model handler says which engine loaded
    assert not any(name in log for name in (" botocore", " faiss.loader", " gcsfs",
                                            "Found credentials", " fsspec")), log
    assert outputs.read_marker(results) is None  # nothing looks complete ...
    with pytest.raises(outputs.OutputError, match="no _SUCCESS marker"):
        features.read_table(results, "anomalies")  # ... and readers refuse it
    capsys.readouterr()
    assert main(["report", results]) != 0
    assert "no _SUCCESS marker" in capsys.readouterr().err
    dn2(*args)  # the rerun
    reference = scores(f"{out}/run/results", "anomalies")
    rerun = scores(results, "anomalies")
    assert sorted(rerun) == sorted(reference)
    np.testing.assert_allclose([rerun[k] for k in sorted(reference)],
                               [reference[k] for k in sorted(reference)], rtol=1e-5, atol=1e-5)
    fs, path = outputs.fresh_fs_and_path(results)
    assert [p for p in fs.find(path) if outputs.STAGING_PREFIX in p] == []
    # A second run into the committed output replaces every row
    dn2("score", "--features", f"{out}/run/normal_features", "--index", f"{out}/run/index",
        "--output", results)
    normal = features.read_table(f"{out}/run/normal_features", "features", columns=["uri"])
    assert sorted(scores(results, "anomalies")) == sorted(
        _relative(u) for u in normal.column("uri").to_pylist())
    summary = json.loads(fs.cat_file(f"{path}/summary.json"))
    assert summary["count_in"] == normal.num_rows == summary["scored"] + summary["errored"]
    fs.invalidate_cache(path)
    assert sorted(posixpath.relpath(p, path) for p in fs.find(path)) == sorted(
        [*outputs.committed_files(results), outputs.MARKER])


def test_a_stray_shard_on_the_store_is_never_read(store_runs):
    _, out, _ = store_runs
    results = f"{out}/ivf-results"
    before = scores(results, "anomalies")
    fs, path = outputs.fs_and_path(results)
    shard = outputs.committed_files(results)[0]
    fs.pipe_file(f"{path}/anomalies-00007-of-00008.parquet", fs.cat_file(f"{path}/{shard}"))
    try:
        assert scores(results, "anomalies") == before
        assert main(["report", results, "--output", f"{out}/stray-report.html"]) == 0
    finally:
        fs.rm(f"{path}/anomalies-00007-of-00008.parquet")


def test_reuse_and_add_with_everything_on_the_store(store_runs):
    """dn2 embed --reuse (the earlier features read through fsspec, the copy written by
    Beam's filesystem) and dn2 build-index --add (the parent's shards copied on the store)."""
    store, out, _ = store_runs
    dn2("embed", "--input", f"{store}/incoming/", "--output", f"{out}/reused",
        "--reuse", f"{out}/run/features")
    fs, path = outputs.fresh_fs_and_path(out)
    marker = json.loads(fs.cat_file(f"{path}/reused/_SUCCESS"))
    assert marker["reused"] == {"from": f"{out}/run/features", "images": 30}
    assert marker["embedded"] == marker["count_in"] == 30  # every one copied, none embedded
    t_new, X_new, _ = features.load_features(f"{out}/reused")
    t_old, X_old, _ = features.load_features(f"{out}/run/features")
    old = dict(zip(t_old.column("uri").to_pylist(), X_old, strict=True))
    for uri, x in zip(t_new.column("uri").to_pylist(), X_new, strict=True):
        np.testing.assert_array_equal(x, old[uri])
    dn2("build-index", "--add", f"{out}/run/features", "--index", f"{out}/run/index",
        "--output", f"{out}/grown")
    grown = json.loads(fs.cat_file(f"{path}/grown/_SUCCESS"))
    parent = json.loads(fs.cat_file(f"{path}/run/index/_SUCCESS"))
    assert grown["parent_index_id"] == parent["index_id"]
    # The default cleans the added images by the parent's auto threshold; this parent (24
    # normal rows, under the rule's 50) was not cleaned, so neither are they, and it says so.
    kept = pq.read_table(fs.open(f"{path}/grown/normal.parquet", "rb")).column("kept").to_numpy()
    added = grown["cleaning"]["added"]
    assert parent["cleaning"]["rule"] == "not applied"
    assert added["rule"] == "off" and added["removed"] == 0 and kept.all()
    assert "the parent index was not cleaned" in added["why"]
    assert grown["counts"]["kept"] == parent["counts"]["kept"] + kept[-30:].sum()
    vectors = np.concatenate(list(LoadedIndex(f"{out}/grown", device="cpu").iter_shards()))
    _, X_normal, _ = features.load_features(f"{out}/run/normal_features")
    union = np.concatenate([X_normal, X_old])[kept].astype(np.float64)
    union = np.sqrt(np.sqrt(union))  # root4
    union /= np.linalg.norm(union, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, union, rtol=1e-5, atol=1e-6)
    fs.invalidate_cache(path)
    assert [p for p in fs.find(f"{path}/grown") if outputs.STAGING_PREFIX in p] == []
