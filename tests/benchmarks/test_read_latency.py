"""benchmarks/read_latency.py: the delaying filesystem reads and lists like local disk."""

from __future__ import annotations

import time

import fsspec

from benchmarks.read_latency import PROTOCOL
from dn2ops.io.sources import list_source


def test_slow_store_lists_and_reads_like_local_disk_after_the_delay(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x" * 10)
    (tmp_path / "y.png").write_bytes(b"y")
    monkeypatch.setitem(fsspec.config.conf, PROTOCOL, {"delay_s": 0.2})
    rows = list(list_source(f"{PROTOCOL}://{tmp_path}/"))
    assert [r["uri"] for r in rows] == [f"{PROTOCOL}://{tmp_path}/a/x.png",
                                        f"{PROTOCOL}://{tmp_path}/y.png"]
    t0 = time.perf_counter()
    with fsspec.open(rows[0]["uri"], "rb") as f:
        assert f.read() == b"x" * 10
    assert time.perf_counter() - t0 >= 0.2
