"""Storage faults through the dn2 command, on S3 (moto) and GCS (fake-gcs-server) behind
a proxy on 127.0.0.1 (tests.objectstores.FaultProxy).

Transient faults (5 % of requests answered 503 or 500, seeded) are retried by the store
clients: every image is scored, none is recorded as errored, the scores are those of a
fault-free run. An image that is gone (404) is an error row. A permanent fault (access
denied on a listing or on the output, a bucket that does not exist, access denied while
the pipeline writes) ends the run with one line and leaves the committed output as it was.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import types
import urllib.parse
import uuid

import numpy as np
import pytest

from benchmarks.datasets import write_manifest, write_png_store
from dn2ops.io import features, outputs
from pipelines.cli import main
from tests.conftest import digit_images
from tests.objectstores import FaultProxy, fake_gcs_compatible

pytestmark = pytest.mark.objectstore

FAULT_RATE, SEED = 0.05, 20261205
N_NORMAL, N_INCOMING = 8, 12
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def _clear_s3fs_instances() -> None:
    """s3fs keeps one filesystem per set of arguments, bound to the endpoint it first saw."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module", params=["gs", "s3"])
def faulty(request, tmp_path_factory):
    """A bucket on the store's server, reached through a FaultProxy (failing nothing yet),
    holding normal/, incoming/ and incoming.csv, which also names an image that is gone."""
    protocol = request.param
    server = request.getfixturevalue("fake_gcs_server" if protocol == "gs" else "moto_server")
    proxy = FaultProxy(server.url, protocol, seed=SEED).start()
    local = tmp_path_factory.mktemp("fault-store")
    normal, incoming, _ = digit_images(n_normal=N_NORMAL, n_incoming=N_INCOMING)
    write_png_store(normal, [f"n{i:03d}" for i in range(N_NORMAL)], str(local / "normal"))
    names = [f"i{i:03d}" for i in range(N_INCOMING)]
    write_png_store(incoming, names, str(local / "incoming"))
    write_manifest([{"uri": f"incoming/{n}.png"} for n in [*names, "gone"]],
                   str(local / "incoming.csv"))
    endpoint = "STORAGE_EMULATOR_HOST" if protocol == "gs" else "AWS_ENDPOINT_URL"
    with pytest.MonkeyPatch.context() as mp, (
            fake_gcs_compatible() if protocol == "gs" else contextlib.nullcontext()):
        for k, v in {**server.env, endpoint: proxy.url}.items():
            mp.setenv(k, v)
        _clear_s3fs_instances()
        bucket = server.new_bucket(f"dn2-{uuid.uuid4().hex[:10]}")
        fs, path = outputs.fs_and_path(bucket)
        fs.put(str(local), f"{path}/store", recursive=True)
        yield types.SimpleNamespace(proxy=proxy, bucket=bucket, store=f"{bucket}/store")
    proxy.stop()
    _clear_s3fs_instances()


def _run(faulty, out: str) -> int:
    return main(["run", "--normal", f"{faulty.store}/normal", "--input",
                 f"{faulty.store}/incoming.csv", "--output", out, "--batch-size", "4"])


@pytest.fixture(scope="module")
def reference(faulty):
    """dn2 run with no fault: OUT."""
    out = f"{faulty.bucket}/reference"
    assert _run(faulty, out) == 0
    return out


def _scores(results: str) -> dict[str, float]:
    rows = features.read_table(results, "anomalies", columns=["uri", "score"]).to_pylist()
    return {posixpath.basename(r["uri"]): r["score"] for r in rows}


def test_transient_faults_are_retried_and_change_nothing(faulty, reference):
    proxy = faulty.proxy
    proxy.reset()
    proxy.rate = FAULT_RATE
    try:
        code = _run(faulty, f"{faulty.bucket}/faulty")
    finally:
        proxy.rate = 0.0
    stats = proxy.stats()
    results = f"{faulty.bucket}/faulty/results"
    summary = json.loads(outputs.fs_and_path(results)[0].cat_file(
        outputs.join(outputs.fs_and_path(results)[1], "summary.json")))
    print(f"{faulty.bucket}: {FAULT_RATE:.0%} faults, seed {SEED}: {stats}; scored "
          f"{summary['scored']} of {summary['count_in']}, errors {summary['errors_by_stage']}")
    assert code == 0
    assert stats["failed"] > 0 and stats["retried"] > 0
    # Every image scored; the one error is the image that is gone, as without faults.
    assert (summary["count_in"], summary["scored"], summary["errored"]) == (
        N_INCOMING + 1, N_INCOMING, 1)
    errors = features.read_table(results, "errors").to_pylist()
    assert [(posixpath.basename(e["uri"]), e["stage"]) for e in errors] == [("gone.png", "read")]
    want, got = _scores(f"{reference}/results"), _scores(results)
    assert sorted(got) == sorted(want) == [f"i{i:03d}.png" for i in range(N_INCOMING)]
    print(f"largest score difference to the fault-free run: "
          f"{max(abs(got[k] - want[k]) for k in want):.3g}")
    np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)],
                               rtol=1e-5, atol=1e-5)


def _snapshot(directory: str) -> dict[str, bytes]:
    fs, path = outputs.fresh_fs_and_path(directory)
    return {p: fs.cat_file(p) for p in sorted(fs.find(path))}


def _unquoted(url: str, body: bytes) -> str:
    return urllib.parse.unquote(url) + body[:2000].decode("latin-1")


def test_permanent_faults_end_the_run_and_keep_the_committed_output(faulty, reference,
                                                                   capsys):
    results, proxy = f"{reference}/results", faulty.proxy
    before = _snapshot(results)
    score_images = ["score", "--input", f"{faulty.store}/incoming/", "--index",
                    f"{reference}/index", "--output", results]
    score_features = ["score", "--features", f"{reference}/features", "--index",
                      f"{reference}/index", "--output", results]
    gone_bucket = f"{faulty.bucket.split(':')[0]}://dn2-gone-{uuid.uuid4().hex[:8]}"
    cases = {
        "access denied on listing the input": (score_images, lambda m, u, b: m == "GET" and (
            "prefix=store/incoming" in _unquoted(u, b))),
        "access denied on the output": (score_features, lambda m, u, b: m in WRITES and (
            "reference/results" in _unquoted(u, b))),
        "access denied on the staged writes (mid-run)": (
            score_features, lambda m, u, b: m in WRITES and "/_staging-" in _unquoted(u, b)),
        "the output's bucket does not exist": (
            [*score_features[:-1], f"{gone_bucket}/results"], None),
    }
    said = {}
    for label, (argv, rule) in cases.items():
        proxy.rules.clear()
        if rule is not None:
            proxy.deny(rule, 403)
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        proxy.rules.clear()
        said[label] = [line for line in err.splitlines() if line.startswith("dn2 ")]
        assert code == 1, (label, err[-3000:])
        assert "Traceback" not in err, (label, err[-3000:])
        assert len(said[label]) == 1 and said[label][0].startswith("dn2 score: error: ")
        assert _snapshot(results) == before, label  # the committed output, as it was
    print("\n".join(f"{label}: {lines[0]}" for label, lines in said.items()))
    assert said["access denied on listing the input"][0].startswith(
        "dn2 score: error: access denied (")
    assert "cannot take the lease on" in said["access denied on the output"][0]
    assert said["access denied on the staged writes (mid-run)"][0].startswith(
        "dn2 score: error: access denied (")
    assert ("check that the bucket exists" in said["the output's bucket does not exist"][0])
