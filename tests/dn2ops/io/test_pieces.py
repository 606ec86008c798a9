"""dn2ops.io.pieces: sealed pieces written, checked against their seals and found by a
rerun; a piece that fails its seal, a piece without one and a live run's are not used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from dn2ops.io import lease, outputs, pieces

KEY = "00112233aabbccdd"
SECRET = bytes(range(32))  # the user's resume key (pipelines.resume.secret makes it)


def _rows(n: int, start: int = 0, dim: int = 4) -> list[dict]:
    rng = np.random.default_rng(start)
    return [{"uri": f"/images/{i:03d}.png", "sha256": hashlib.sha256(bytes([i])).hexdigest(),
             "backbone": "b", "dim": dim, "embedding": rng.random(dim, dtype=np.float32)}
            for i in range(start, start + n)]


def _staging(out: Path, key: str = KEY, run: str = "aaaaaaaaaaaa") -> str:
    return str(out / f"{outputs.STAGING_PREFIX}{key}-{run}")


def test_a_sealed_piece_holds_its_rows_and_its_seal_says_so(tmp_path):
    rows = _rows(5)
    path = Path(pieces.seal(_staging(tmp_path), rows, SECRET))
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["piece"] == path.name and record["rows"] == 5
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["inputs"] == [[r["uri"], r["sha256"]] for r in rows]
    table = pq.read_table(path)
    assert table.column("uri").to_pylist() == [r["uri"] for r in rows]
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(
        zero_copy_only=False)), np.stack([r["embedding"] for r in rows]))
    piece, why = pieces.verify(outputs.fs_and_path(str(path))[0], str(path.with_suffix(".json")),
                               SECRET)
    assert why is None and piece == (str(path), 5, record["sha256"])


def test_find_adopts_the_checked_pieces_of_gone_runs_of_the_key(tmp_path):
    gone = _staging(tmp_path, run="deadbeef0001")
    good = [pieces.seal(gone, _rows(3, 0), SECRET), pieces.seal(gone, _rows(4, 3), SECRET)]
    # a piece the run died writing: no seal
    unsealed = Path(pieces.seal(gone, _rows(2, 7), SECRET))
    unsealed.with_suffix(".json").unlink()
    # tampered: one byte of the piece flipped
    tampered = Path(pieces.seal(gone, _rows(2, 9), SECRET))
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 1
    tampered.write_bytes(bytes(data))
    # a seal cut short, and a seal that lists other inputs than the piece holds
    cut = Path(pieces.seal(gone, _rows(1, 11), SECRET)).with_suffix(".json")
    cut.write_text(cut.read_text()[:20])
    lying = Path(pieces.seal(gone, _rows(1, 12), SECRET)).with_suffix(".json")
    record = json.loads(lying.read_text())
    record["inputs"][0][1] = "0" * 64
    record["mac"] = pieces._mac(SECRET, record)  # signed: only the rows give it away
    lying.write_text(json.dumps(record))
    # sealed with another key (another user's run, or a piece and seal planted by someone
    # who can write the output: both match each other, the key does not)
    planted = Path(pieces.seal(gone, _rows(2, 14), bytes(32)))
    # another key's run, a live run of this key, and this run's own staging
    pieces.seal(_staging(tmp_path, key="ffffffffffffffff"), _rows(2), SECRET)
    live = _staging(tmp_path, run="live00000001")
    pieces.seal(live, _rows(2, 20), SECRET)
    own = _staging(tmp_path, run="own000000001")
    pieces.seal(own, _rows(2, 30), SECRET)
    with lease.hold(live, "live-run"):
        found = pieces.find(str(tmp_path), KEY, own, SECRET)
    assert sorted(found.pieces) == sorted(good)
    assert found.images == 7 and found.runs == (Path(gone).name,)
    why = {Path(name).stem: reason for name, reason in found.dropped}
    assert why.keys() == {tampered.stem, cut.stem, lying.stem, planted.stem}
    assert "not signed with this user's resume key" in why[planted.stem]
    assert why[tampered.stem].startswith("checksum mismatch")
    assert why[cut.stem].startswith("its seal is not readable")
    assert why[lying.stem] == "its rows are not the inputs its seal lists"
    assert found.others == (f"{outputs.STAGING_PREFIX}ffffffffffffffff-aaaaaaaaaaaa",)


def test_find_in_a_directory_that_does_not_exist(tmp_path):
    assert pieces.find(str(tmp_path / "none"), KEY, _staging(tmp_path), SECRET) == pieces.Found()


def test_seal_pieces_hands_every_row_on_after_sealing_it(tmp_path):
    staging = _staging(tmp_path)
    rows = _rows(10)
    with test_pipeline.TestPipeline() as p:
        out = (p | beam.Create(rows, reshuffle=False)
               | beam.ParDo(pieces.SealPieces(staging, rows=4, secret=SECRET))
               | beam.Map(lambda r: r["uri"]))
        assert_that(out, equal_to([r["uri"] for r in rows]))
    seals = [json.loads(s.read_text()) for s in Path(staging, pieces.PIECES).glob("*.json")]
    assert all(s["rows"] <= 4 for s in seals)
    assert sorted(u for s in seals for u, _ in s["inputs"]) == [r["uri"] for r in rows]


def test_seal_pieces_seals_waiting_rows_while_no_row_comes(tmp_path):
    """The rows of one model call are sealed once they have waited SEAL_MIN_S, while the
    bundle's thread is busy elsewhere (in the next model call) and sends no row; they are
    handed on, once each, with the next row, and the rest at the bundle's end."""
    import time

    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import Timestamp

    at = {"timestamp": Timestamp(0), "window": GlobalWindow()}
    staging = _staging(tmp_path)
    fn = pieces.SealPieces(staging, rows=100, secret=SECRET)
    fn.setup()
    try:
        fn.start_bundle()
        first, later = _rows(3), _rows(2, start=3)
        assert [list(fn.process(r, **at)) for r in first] == [[], [], []]  # held: not due yet
        folder = Path(staging, pieces.PIECES)
        deadline = time.monotonic() + pieces.SEAL_MIN_S + 5
        while not list(folder.glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.02)
        (seal,) = [json.loads(p.read_text()) for p in folder.glob("*.json")]
        assert [u for u, _ in seal["inputs"]] == [r["uri"] for r in first]
        out = list(fn.process(later[0], **at))  # the watcher's rows come out with the next row
        assert [w.value["uri"] for w in out] == [r["uri"] for r in first]
        out = list(fn.process(later[1], **at)) + list(fn.finish_bundle())
        assert [w.value["uri"] for w in out] == [r["uri"] for r in later]
        seals = [json.loads(p.read_text()) for p in folder.glob("*.json")]
        assert sorted(u for s in seals for u, _ in s["inputs"]) == sorted(
            r["uri"] for r in first + later)
    finally:
        fn.teardown()


def test_a_commit_leaves_a_live_runs_staging_alone(tmp_path):
    """outputs.commit deletes the staging of a gone run, never that of a live one (its
    staging folder's own lease)."""
    out = tmp_path / "out"
    gone, live = _staging(out, run="gone00000001"), _staging(out, run="live00000001")
    pieces.seal(gone, _rows(2), SECRET)
    pieces.seal(live, _rows(2), SECRET)
    mine = outputs.new_staging(str(out))
    fs, path = outputs.fs_and_path(mine)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/summary.json", b"{}")
    with lease.hold(live, "live-run"):
        outputs.commit(mine, str(out), {"kind": "results"})
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [Path(live).name, outputs.MARKER, "summary.json"])
        assert len(list(Path(live, pieces.PIECES).glob("*.json"))) == 1


def test_pieces_sealed_in_a_bucket_are_found_and_read_back(bucket):
    """The same on a real object store (moto's S3, fake-gcs-server): seal, find, read."""
    out = f"{bucket}/pieces-{KEY}"
    gone = f"{out}/{outputs.STAGING_PREFIX}{KEY}-deadbeef0001"
    rows = [_rows(3, 0), _rows(2, 3)]
    sealed = [pieces.seal(gone, r, SECRET) for r in rows]
    found = pieces.find(out, KEY, f"{out}/{outputs.STAGING_PREFIX}{KEY}-own000000001",
                        SECRET)
    assert found.images == 5 and found.pieces[0].startswith(bucket)  # URIs: the store's
    assert sorted(p.split("://", 1)[1] for p in found.pieces) == sorted(sealed)  # paths
    fs, path = outputs.fs_and_path(f"{bucket.split('://')[0]}://{sealed[0]}")
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    assert table.column("uri").to_pylist() == [r["uri"] for r in rows[0]]
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(
        zero_copy_only=False)), np.stack([r["embedding"] for r in rows[0]]))
