"""Reliability through the dn2 command: bad inputs, nothing lost, atomic outputs, clear checks.

Everything is generated here (nothing is downloaded): a corpus of bad and odd inputs mixed
with real handwritten digits, crafted mismatching features and damaged index files.
benchmarks/bad_inputs.py imports the builders below to print the same results for people.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

import dn2ops.embed.stage
from benchmarks.datasets import write_manifest, write_png_store
from dn2ops.config import DEFAULT_BACKBONE
from dn2ops.engines.torch import Embedder
from dn2ops.io import outputs
from dn2ops.io.features import read_table
from pipelines.cli import main
from tests.conftest import digit_images

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------

PERM_PROTOCOL = "dn2-perm"


class PermissionBitsFileSystem(LocalFileSystem):
    """Local files opened as a non-root user would open them.

    The test machine runs as root, and root reads a ``chmod 000`` file anyway.
    This filesystem honours the owner's read bit even for root, so the file
    reaches dn2's reader (fsspec.open -> PermissionError) exactly as an
    unreadable file does for the unprivileged worker of a real deployment.
    """

    protocol = (PERM_PROTOCOL,)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(f"{PERM_PROTOCOL}://"):
            path = path[len(f"{PERM_PROTOCOL}://"):]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        local = self._strip_protocol(path)
        if "r" in mode and not os.stat(local).st_mode & stat.S_IRUSR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), local)
        return super()._open(local, mode, **kwargs)


fsspec.register_implementation(PERM_PROTOCOL, PermissionBitsFileSystem, clobber=True)


@dataclasses.dataclass(frozen=True)
class Case:
    """One entry of the corpus and what dn2 must make of it."""

    name: str  # path under the corpus dir ("" for none)
    what: str  # what the entry is, for people
    stage: str  # "scored", or the errors-table stage
    reason: str = ""  # a piece of the error message a person can act on


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _digit(i: int, size: int = 64) -> Image.Image:
    """A real handwritten digit (scikit-learn's), grey, upscaled to size x size."""
    _, incoming, _ = digit_images()
    return Image.fromarray(incoming[i % len(incoming)]).resize((size, size))


def _noise_rgb(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header is patched to declare width x height (a decompression bomb)."""
    png = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return _encode(_digit(3).resize((64, 32)).convert("RGB"), "JPEG", exif=exif.tobytes())


def _palette_transparent_png() -> bytes:
    img = _digit(4).convert("P")
    img.info["transparency"] = 0
    return _encode(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [_digit(5).convert("RGB"), _digit(6).convert("RGB")]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def _gray16_png() -> bytes:
    values = np.asarray(_digit(7), dtype=np.uint16) * 257  # 8 -> 16 bits, full range
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    return _encode(img, "PNG")


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def write_corpus(root: Path) -> tuple[list[Case], str]:
    """Writes the bad-input corpus, mixed with good images, under ``root``.

    Returns (the cases, the path of ``root/incoming.csv``: a manifest naming every
    case). The manifest is what lets the corpus name a directory and a file that
    only a permission check stops (see PermissionBitsFileSystem).
    """
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        "good-0.png": _encode(_digit(0), "PNG"),
        "good-1.png": _encode(_digit(1), "PNG"),
        "good-2.jpg": _encode(_digit(2).convert("RGB"), "JPEG", quality=95),
        "empty.jpg": b"",
        "truncated.jpg": _truncated(_encode(_noise_rgb((96, 96), 1), "JPEG", quality=95)),
        "truncated.png": _truncated(_encode(_noise_rgb((96, 96), 2), "PNG")),
        "notes.jpg": b"camera roll export 2026-11-28\nnothing to see here\n" * 3,
        "error-page.png": (b"<!DOCTYPE html>\n<html><head><title>503 Service Unavailable"
                           b"</title></head><body><h1>503</h1></body></html>\n"),
        "bomb.png": _png_declaring(30_000, 30_000),
        "cmyk.jpg": _encode(_digit(8).convert("CMYK"), "JPEG"),
        "gray16.png": _gray16_png(),
        "palette-transparent.png": _palette_transparent_png(),
        "exif-rotated.jpg": _exif_rotated_jpeg(),
        "animated.gif": _animated_gif(),
        "scan.tiff": _encode(_digit(9).convert("RGB"), "TIFF"),
        "photo.webp": _encode(_digit(10).convert("RGB"), "WEBP", lossless=True),
        "café crème ünïcode.png": _encode(_digit(11), "PNG"),
        "duplicate-a.png": _encode(_digit(12), "PNG"),
        "duplicate-b.png": _encode(_digit(12), "PNG"),
        "folder.png/inner.png": _encode(_digit(13), "PNG"),
        "locked.png": _encode(_digit(14), "PNG"),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    os.chmod(root / "locked.png", 0)
    as_root = os.geteuid() == 0
    locked_uri = (f"{PERM_PROTOCOL}://{(root / 'locked.png').resolve()}" if as_root
                  else "locked.png")
    cases = [
        Case("good-0.png", "good PNG", "scored"),
        Case("good-1.png", "good PNG", "scored"),
        Case("good-2.jpg", "good JPEG", "scored"),
        Case("empty.jpg", "zero-byte file", "decode", "empty file (0 bytes)"),
        Case("truncated.jpg", "JPEG cut in half", "decode", "truncated or corrupt image data"),
        Case("truncated.png", "PNG cut in half", "decode", "truncated or corrupt image data"),
        Case("notes.jpg", "text file named .jpg", "decode", "not an image: the file holds text"),
        Case("error-page.png", "HTML error page saved as .png", "decode",
             "not an image: the file holds HTML text"),
        Case("bomb.png", "PNG declaring 30000x30000 pixels", "decode", "decompression bomb"),
        Case("cmyk.jpg", "CMYK JPEG", "scored"),
        Case("gray16.png", "16-bit grayscale PNG", "scored"),
        Case("palette-transparent.png", "palette PNG with transparency", "scored"),
        Case("exif-rotated.jpg", "EXIF-rotated JPEG (orientation 6)", "scored"),
        Case("animated.gif", "animated GIF (2 frames)", "scored"),
        Case("scan.tiff", "TIFF", "scored"),
        Case("photo.webp", "WebP", "scored"),
        Case("café crème ünïcode.png", "name with spaces and non-ASCII letters", "scored"),
        Case("duplicate-a.png", "the same image twice (1)", "scored"),
        Case("duplicate-b.png", "the same image twice (2)", "scored"),
        Case("folder.png", "directory named like an image", "read", "is a directory"),
        Case("folder.png/inner.png", "good PNG inside that directory", "scored"),
        Case(locked_uri, "file without read permission"
             + (" (root: owner read bit enforced)" if as_root else ""), "read",
             "permission denied"),
    ]
    manifest = str(root / "incoming.csv")
    write_manifest([{"uri": c.name} for c in cases], manifest)
    return cases, manifest


def write_normal_store(root: Path, n: int = 16) -> Path:
    """n real handwritten zeros as PNGs: the normal set."""
    normal, _, _ = digit_images(n_normal=n)
    write_png_store(normal, [f"n{i:03d}" for i in range(n)], str(root))
    return root


def expected_uri(root: Path, case: Case) -> str:
    """The uri dn2 reports for a case (manifest uris are relative to the manifest)."""
    return case.name if "://" in case.name else str(root / case.name)


def run_corpus(root: Path, *extra: str) -> tuple[int, list[Case], Path]:
    """Writes normal store and corpus under ``root`` and runs ``dn2 run`` on them in-process.

    In-process (the FnApiRunner) so that the permission-enforcing filesystem is registered
    where the images are read. Returns (exit code, cases, OUT_DIR).
    """
    normal = write_normal_store(root / "normal")
    cases, manifest = write_corpus(root / "incoming")
    out = root / "out"
    code = main(["run", "--normal", str(normal), "--input", manifest, "--output", str(out),
                 *extra])
    return code, cases, out


def outcome_table(root: Path, cases: list[Case], results: Path) -> list[dict[str, str]]:
    """One row per case: what dn2 made of it (scored with rank, or error stage + reason)."""
    scored = {r["uri"]: r for r in read_table(str(results), "anomalies").to_pylist()}
    errors = {r["uri"]: r for r in read_table(str(results), "errors").to_pylist()}
    rows = []
    for case in cases:
        uri = expected_uri(root / "incoming", case)
        if uri in scored:
            got = {"outcome": "scored", "detail": f"rank {scored[uri]['rank']}, "
                                                  f"score {scored[uri]['score']:.3f}"}
        elif uri in errors:
            got = {"outcome": errors[uri]["stage"], "detail": errors[uri]["error"]}
        else:
            got = {"outcome": "MISSING", "detail": "neither scored nor in the errors table"}
        rows.append({"name": case.name.rsplit("/incoming/", 1)[-1], "what": case.what,
                     "expected": case.stage, **got})
    return rows


# --------------------------------------------------------------------------
# Crafted mismatches and damaged files
# --------------------------------------------------------------------------


def copy_features(src: Path, dst: Path, *, marker: dict | None = None,
                  rows_dim: int | None = None) -> Path:
    """A copy of a features dir, its marker updated with ``marker`` and its rows' embeddings
    cut to ``rows_dim`` values (the ``dim`` column too)."""
    shutil.copytree(src, dst)
    if rows_dim is not None:
        for shard in dst.glob("features-*.parquet"):
            table = pq.read_table(shard)
            cut = [e[:rows_dim] for e in table.column("embedding").to_pylist()]
            table = table.set_column(table.schema.get_field_index("embedding"), "embedding",
                                     pa.array(cut, pa.list_(pa.float32())))
            table = table.set_column(table.schema.get_field_index("dim"), "dim",
                                     pa.array([rows_dim] * len(cut), pa.int32()))
            pq.write_table(table, shard)
    if marker:
        meta = json.loads((dst / outputs.MARKER).read_text())
        for key, value in marker.items():
            if isinstance(value, dict):
                meta[key] = {**meta[key], **value}
            else:
                meta[key] = value
        (dst / outputs.MARKER).write_text(json.dumps(meta))
    return dst


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_and_reseal(index_dir: Path, name: str, keep: float = 0.5) -> None:
    """Cuts index file ``name`` to ``keep`` of its bytes and writes its new sha256 into the
    manifest, so the checksum passes and the reader meets the damaged bytes themselves."""
    path = index_dir / name
    data = path.read_bytes()[: int(path.stat().st_size * keep)]
    path.write_bytes(data)
    manifest = json.loads((index_dir / outputs.MARKER).read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (index_dir / outputs.MARKER).write_text(json.dumps(manifest))


class _Hostile:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@dataclasses.dataclass
class Mismatch:
    label: str
    argv: list[str]
    expect: tuple[str, ...]  # pieces of the message the user must see
    untouched: Path | None = None  # must not exist afterwards: no heavy work was started
    kept: Path | None = None  # someone else's file that must still be there


def prepare_mismatches(out: Path, corpus: Path, work: Path) -> list[Mismatch]:
    """Builds every mismatching or damaged input under ``work``, from a finished `dn2 run`
    OUT_DIR ``out``; returns the commands that must refuse them."""
    work.mkdir(parents=True, exist_ok=True)
    feats, index = out / "features", out / "index"
    good = str(corpus / "incoming" / "good-0.png")

    def score(features: Path, idx: Path, name: str) -> Mismatch:
        res = work / f"results-{name}"
        return Mismatch("", ["score", "--features", str(features), "--index", str(idx),
                             "--output", str(res)], (), res)

    cases = []
    m = Mismatch("scoring with another backbone than the index's",
                 ["score", "--input", good, "--index", str(index), "--backbone", "resnet18",
                  "--output", str(work / "results-backbone")],
                 ("--backbone and the index do not match",
                  f"backbone: index '{DEFAULT_BACKBONE}', --backbone 'resnet18'",
                  "dim: index 2560, --backbone 512"), work / "results-backbone")
    cases.append(m)

    resized = copy_features(feats, work / "features-resize288",
                            marker={"preprocessing": {"resize": 288}})
    m = score(resized, index, "preprocessing")
    m.label = "features made with other preprocessing (resize 288) than the index's"
    m.expect = ("the features and the index do not match", "preprocessing.resize: index 274, "
                "features 288")  # the default backbone's 274 -> 240
    cases.append(m)

    narrow = copy_features(feats, work / "features-dim512", marker={"dim": 512}, rows_dim=512)
    m = score(narrow, index, "dim")
    m.label = "features of dimension 512, index of 2560"
    m.expect = ("the features and the index do not match", "dim: index 2560, features 512")
    cases.append(m)

    lying = copy_features(feats, work / "features-rows512", rows_dim=512)
    m = score(lying, index, "rows")
    m.label = "feature rows of dimension 512 under a marker that says 2560"
    m.expect = ("have dimension [512]", f"{outputs.MARKER} marker says 2560")
    cases.append(m)

    unfinished = work / "features-unfinished"
    shutil.copytree(feats, unfinished)
    (unfinished / outputs.MARKER).unlink()  # as an embed killed before its commit leaves it
    m = score(unfinished, index, "unfinished")
    m.label = "features directory without its _SUCCESS marker"
    m.expect = ("has no _SUCCESS marker: it is not a complete dn2 features directory",)
    cases.append(m)

    bad_normal = work / "normal-all-bad"
    bad_normal.mkdir()
    (bad_normal / "a.png").write_bytes(b"<html>404</html>")
    (bad_normal / "b.jpg").write_bytes(b"")
    (work / "normal-empty").mkdir()
    for label, normal, expect in [
        ("normal set where every image is bad", bad_normal,
         ("the normal set is empty: none of the 2 images", "errors-*.parquet for why")),
        ("normal set directory with no images", work / "normal-empty",
         ("the normal set is empty", "lists no image files")),
        ("normal set directory that does not exist", work / "normal-missing",
         ("--normal", "normal-missing does not exist")),
    ]:
        run_out = work / f"run-{normal.name}"
        cases.append(Mismatch(label, ["run", "--normal", str(normal), "--input", good,
                                      "--output", str(run_out)], expect,
                              run_out / "features"))  # the input is never embedded

    tampered = work / "index-tampered"
    shutil.copytree(index, tampered)
    flip_byte(tampered / "shard-00000-of-00001.faiss")
    m = score(feats, tampered, "tampered")
    m.label = "index shard with one byte flipped"
    m.expect = ("index file shard-00000-of-00001.faiss has sha256", "the manifest says",
                "rebuild the index")
    cases.append(m)

    for name, keep in [("shard-00000-of-00001.faiss", 0.5), ("shard-00000-of-00001.faiss", 0.0),
                       ("normal.parquet", 0.5)]:
        damaged = work / f"index-truncated-{name}-{keep}"
        shutil.copytree(index, damaged)
        truncate_and_reseal(damaged, name, keep)
        m = score(feats, damaged, damaged.name)
        m.label = f"index file {name} cut to {keep:.0%} of its bytes, checksum recomputed"
        m.expect = (f"index file {name} is corrupt or truncated",)
        cases.append(m)

    ivf = work / "index-ivf"
    assert main(["build-index", "--features", str(out / "normal_features"), "--output",
                 str(ivf), "--ivf", "2", "--nprobe", "1"]) == 0
    truncate_and_reseal(ivf, "ivf.faiss", 0.5)
    m = score(feats, ivf, "ivf")
    m.label = "IVF index file ivf.faiss cut to 50% of its bytes, checksum recomputed"
    m.expect = ("index file ivf.faiss is corrupt or truncated",)
    cases.append(m)

    garbled = work / "index-garbled-manifest"
    shutil.copytree(index, garbled)
    (garbled / outputs.MARKER).write_bytes((index / outputs.MARKER).read_bytes()[:40])
    m = score(feats, garbled, "garbled")
    m.label = "index manifest (_SUCCESS) cut short"
    m.expect = (f"{outputs.MARKER} is damaged (not JSON",)
    cases.append(m)

    cases.append(Mismatch("--output is a features directory",
                          ["score", "--features", str(feats), "--index", str(index),
                           "--output", str(feats)],
                          (f"output path {feats} holds dn2 features output, not results",)))
    junk = work / "unrelated"
    junk.mkdir()
    (junk / "notes.txt").write_text("someone else's data\n")
    cases.append(Mismatch("--output holds unrelated files",
                          ["score", "--features", str(feats), "--index", str(index),
                           "--output", str(junk)],
                          ("is not empty and holds no dn2 results output", "'notes.txt'"),
                          kept=junk / "notes.txt"))
    cases.append(Mismatch("dn2 run --output is a features directory",
                          ["run", "--normal", str(corpus / "normal"), "--input", good,
                           "--output", str(feats)],
                          (f"output path {feats} holds dn2 features output, not the "
                           "normal_features, index, features, results directories",),
                          feats / "normal_features"))
    cases.append(Mismatch("dn2 run --output holds unrelated files",
                          ["run", "--normal", str(corpus / "normal"), "--input", good,
                           "--output", str(junk)],
                          ("is not empty and holds no dn2 run output", "'notes.txt'"),
                          junk / "normal_features", junk / "notes.txt"))

    hostile = work / "hostile.pt"
    torch.save({"conv1.weight": _Hostile(work / "code-ran")}, hostile)
    cases.append(Mismatch("weights file that would run code when unpickled",
                          ["embed", "--input", good, "--backbone", "resnet18", "--weights",
                           str(hostile), "--output", str(work / "features-hostile")],
                          ("cannot read weights", "Unsupported global: GLOBAL io.open",
                           "weights_only=True"), work / "code-ran"))
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, buf)
    (work / "truncated.pt").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases.append(Mismatch("truncated weights file",
                          ["embed", "--input", good, "--backbone", "resnet18", "--weights",
                           str(work / "truncated.pt"), "--output",
                           str(work / "features-truncated")],
                          ("cannot read weights", "truncated.pt", "damaged, truncated"),
                          work / "features-truncated"))
    return cases


# --------------------------------------------------------------------------
# Killing a run
# --------------------------------------------------------------------------


def kill_when_staged(argv: list[str], output: Path, log: Path,
                     timeout: float = 600.0, *, module: str = "pipelines.cli",
                     staged_files: Callable[[], list[str]] | None = None) -> dict:
    """Runs ``python -m MODULE ARGV`` (dn2) in a subprocess and SIGKILLs it once something
    is staged: ``staged_files()`` is not empty (default: files under OUTPUT/_staging-*).

    Returns the exit status (-9 when killed), the seconds until the kill and what was
    staged at that moment.
    """
    def local_staged() -> list[str]:
        found = sorted(output.glob("_staging-*"))[:1]
        return [str(p.relative_to(output)) for d in found for p in [d, *sorted(d.rglob("*"))]]

    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)
        start = time.monotonic()
        staged: list[str] = []
        try:
            while proc.poll() is None and time.monotonic() - start < timeout:
                staged = (staged_files or local_staged)()
                if staged:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None and not staged:
                proc.kill()
            proc.wait()
    return {"returncode": proc.returncode, "seconds": round(time.monotonic() - start, 1),
            "staged": staged}


def ranked_rows(results: Path) -> list[tuple[str, int, float]]:
    """(uri, rank, score) of a results dir, best rank first."""
    table = read_table(str(results), "anomalies", columns=["uri", "rank", "score"])
    return sorted(((r["uri"], r["rank"], r["score"]) for r in table.to_pylist()),
                  key=lambda r: (r[1], r[0]))


def same_ranking(a: Path, b: Path) -> tuple[bool, float]:
    """(same uris in the same ranks, the largest score difference) of two results dirs.

    Scores may differ by float rounding: images are batched in another order on a rerun.
    """
    ra, rb = ranked_rows(a), ranked_rows(b)
    same = [(u, r) for u, r, _ in ra] == [(u, r) for u, r, _ in rb]
    diff = max((abs(x[2] - y[2]) for x, y in zip(ra, rb, strict=True)), default=0.0)
    return same and len(ra) > 0, diff


def looks_complete(results: Path) -> list[str]:
    """What in ``results`` a reader could take for finished output."""
    names = ["_SUCCESS", "summary.json", "top_anomalies.csv"]
    found = [n for n in names if (results / n).exists()]
    return found + sorted(p.name for p in results.glob("anomalies-*.parquet"))


# --------------------------------------------------------------------------
# Tests: the corpus through `dn2 run`
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    code, cases, out = run_corpus(root)
    return root, code, cases, out


def test_every_bad_input_is_scored_or_reported(corpus_run):
    root, code, cases, out = corpus_run
    assert code == 0
    table = outcome_table(root, cases, out / "results")
    for case, row in zip(cases, table, strict=True):
        assert row["outcome"] == case.stage, row
        assert case.reason in row["detail"], row
    errors = read_table(str(out / "results"), "errors").to_pylist()
    assert len(errors) == sum(c.stage != "scored" for c in cases)  # one row each, no repeats


def test_summary_accounts_for_every_input(corpus_run):
    _, _, cases, out = corpus_run
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert summary["count_in"] == len(cases)
    assert summary["count_in"] == summary["scored"] + summary["errored"]
    assert summary["scored"] == sum(c.stage == "scored" for c in cases)
    by_stage: dict[str, int] = {}
    for c in cases:
        if c.stage != "scored":
            by_stage[c.stage] = by_stage.get(c.stage, 0) + 1
    assert summary["errors_by_stage"] == by_stage


def test_the_same_image_twice_gets_the_same_score(corpus_run):
    root, _, _, out = corpus_run
    rows = {r["uri"]: r for r in read_table(str(out / "results"), "anomalies").to_pylist()}
    a, b = (rows[str(root / "incoming" / n)] for n in ("duplicate-a.png", "duplicate-b.png"))
    assert a["sha256"] == b["sha256"] == hashlib.sha256(
        (root / "incoming" / "duplicate-a.png").read_bytes()).hexdigest()
    assert (a["score"], a["rank"]) == (b["score"], b["rank"])


def test_max_error_fraction(corpus_run, tmp_path, capsys):
    _, _, cases, out = corpus_run
    n, bad = len(cases), sum(c.stage != "scored" for c in cases)
    args = ["score", "--features", str(out / "features"), "--index", str(out / "index")]
    limit = round(bad / n - 0.05, 2)
    code = main([*args, "--output", str(tmp_path / "over"), "--max-error-fraction", str(limit)])
    assert code == 1
    err = capsys.readouterr().err
    assert (f"{bad} of {n} inputs errored ({bad / n:.1%} > --max-error-fraction {limit:.1%})"
            in err)
    pointed = err.split("see ", 1)[1].split()[0]
    assert pointed == f"{tmp_path / 'over'}/errors-*.parquet"
    assert read_table(str(tmp_path / "over"), "errors").num_rows == bad  # it is there to see
    ok = main([*args, "--output", str(tmp_path / "under"), "--max-error-fraction",
               str(round(bad / n + 0.05, 2))])
    assert ok == 0


def test_directory_named_like_an_image(tmp_path):
    store = tmp_path / "store"
    write_png_store(digit_images()[0][:2], ["good", "folder.png/inner"], str(store))
    assert (store / "folder.png").is_dir()
    # A glob names the directory itself: it is reported, not dropped.
    assert main(["embed", "--input", str(store / "*"), "--output", str(tmp_path / "g")]) == 0
    errors = read_table(str(tmp_path / "g"), "errors").to_pylist()
    assert [(e["uri"], e["stage"]) for e in errors] == [(str(store / "folder.png"), "read")]
    assert "is a directory" in errors[0]["error"]
    assert read_table(str(tmp_path / "g"), "features").column("uri").to_pylist() == [
        str(store / "good.png")]
    # A directory walk descends into it and lists the file inside.
    assert main(["embed", "--input", str(store), "--output", str(tmp_path / "w")]) == 0
    assert sorted(read_table(str(tmp_path / "w"), "features").column("uri").to_pylist()) == [
        str(store / "folder.png" / "inner.png"), str(store / "good.png")]
    assert read_table(str(tmp_path / "w"), "errors").num_rows == 0


# --------------------------------------------------------------------------
# Tests: worker faults become error rows
# --------------------------------------------------------------------------


def _compiled_backbone():
    from dn2ops.engines.openvino import CompiledBackbone

    return CompiledBackbone


# The engine and what it calls with each batch (the backbone failure is simulated there).
ENGINE_CALLS = {"torch": lambda: Embedder, "openvino": _compiled_backbone}


@pytest.mark.parametrize("engine", sorted(ENGINE_CALLS))
def test_worker_faults_become_error_rows(corpus_run, tmp_path, monkeypatch, engine):
    root, _, _, _ = corpus_run
    normal = sorted((root / "normal").glob("*.png"))
    victim = normal[5]
    victim_bytes = victim.read_bytes()
    model_class = ENGINE_CALLS[engine]()
    real_load, real_call = dn2ops.embed.stage.load_image, model_class.__call__
    calls = []

    def load_image(data, **kwargs):  # a bug that bites one image only
        if data == victim_bytes:
            raise RuntimeError("simulated fault in this image's processing")
        return real_load(data, **kwargs)

    def call(self, batch):  # the backbone fails on the first batch only
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("simulated backbone failure on this batch")
        return real_call(self, batch)

    monkeypatch.setattr(dn2ops.embed.stage, "load_image", load_image)
    monkeypatch.setattr(model_class, "__call__", call)
    out = tmp_path / "f"
    assert main(["embed", "--input", str(root / "normal"), "--output", str(out),
                 "--batch-size", "4", "--engine", engine]) == 0
    errors = read_table(str(out), "errors").to_pylist()
    prepare = [e for e in errors if e["stage"] == "prepare"]
    assert [(e["uri"], e["error"]) for e in prepare] == [
        (str(victim), "RuntimeError: simulated fault in this image's processing")]
    embed = [e for e in errors if e["stage"] == "embed"]
    assert len(embed) == calls[0]  # every image of the failed batch, no more
    for e in embed:
        assert e["error"].endswith("RuntimeError: simulated backbone failure on this batch")
        assert "Traceback" not in e["error"]
    embedded = read_table(str(out), "features").column("uri").to_pylist()
    assert sorted(embedded + [e["uri"] for e in errors]) == sorted(map(str, normal))
    marker = json.loads((out / outputs.MARKER).read_text())
    assert marker["count_in"] == len(normal) == marker["embedded"] + marker["errored"]


# --------------------------------------------------------------------------
# Tests: atomic and idempotent outputs
# --------------------------------------------------------------------------


def test_kill_mid_run_leaves_no_complete_looking_table_and_rerun_matches(corpus_run, tmp_path,
                                                                         capsys):
    root, _, _, out = corpus_run
    _, incoming, _ = digit_images(n_incoming=40)
    store = tmp_path / "store"
    write_png_store(incoming, [f"i{i:03d}" for i in range(len(incoming))], str(store))
    args = ["score", "--input", str(store), "--index", str(out / "index"), "--batch-size", "8"]
    assert main([*args, "--output", str(tmp_path / "reference")]) == 0
    results = tmp_path / "results"
    killed = kill_when_staged([*args, "--output", str(results)], results, tmp_path / "log")
    assert killed["returncode"] == -signal.SIGKILL, killed
    assert looks_complete(results) == []
    with pytest.raises(outputs.OutputError, match="no _SUCCESS marker"):
        read_table(str(results), "anomalies")  # readers refuse an uncommitted directory
    with pytest.raises(outputs.OutputError, match="no _SUCCESS marker"):
        outputs.require_complete(str(results), "results")
    capsys.readouterr()
    assert main(["report", str(results)]) != 0
    assert "has no _SUCCESS marker" in capsys.readouterr().err
    assert main([*args, "--output", str(results)]) == 0
    same, score_diff = same_ranking(results, tmp_path / "reference")
    assert same and score_diff < 1e-4, score_diff
    assert not list(results.glob("_staging-*"))


def test_crash_mid_commit_then_rerun(corpus_run, tmp_path, monkeypatch):
    """A rerun of a finished partition that dies while replacing its files can be rerun."""
    _, _, _, out = corpus_run
    results = tmp_path / "results"
    args = ["score", "--features", str(out / "features"), "--index", str(out / "index"),
            "--output", str(results)]
    assert main(args) == 0
    before = ranked_rows(results)
    real_mv, moved = LocalFileSystem.mv, []

    def mv(self, *a, **kw):  # the process dies after the first file is moved in
        if moved:
            raise KeyboardInterrupt("simulated kill mid-commit")
        moved.append(a)
        return real_mv(self, *a, **kw)

    monkeypatch.setattr(LocalFileSystem, "mv", mv)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.undo()
    assert moved and not (results / outputs.MARKER).exists()
    with pytest.raises(outputs.OutputError, match="no _SUCCESS marker"):
        outputs.require_complete(str(results), "results")
    assert main(args) == 0
    assert ranked_rows(results) == before
    assert not (results / outputs.COMMITTING).exists()


def test_rerun_with_changed_input_replaces_rows(corpus_run, tmp_path):
    _, _, cases, out = corpus_run
    results = tmp_path / "results"
    index = ["--index", str(out / "index"), "--output", str(results)]
    assert main(["score", "--features", str(out / "features"), *index]) == 0
    assert read_table(str(results), "errors").num_rows == sum(c.stage != "scored" for c in cases)
    # The same partition again, now from another input: the normal images.
    assert main(["score", "--features", str(out / "normal_features"), *index]) == 0
    normal = read_table(str(out / "normal_features"), "features").column("uri").to_pylist()
    assert sorted(u for u, _, _ in ranked_rows(results)) == sorted(normal)
    assert read_table(str(results), "errors").num_rows == 0
    assert len(list(results.glob("anomalies-*.parquet"))) == 1
    summary = json.loads((results / "summary.json").read_text())
    assert summary["count_in"] == summary["scored"] == len(normal)


def test_truncated_shard_is_an_error_not_an_interpreter_crash(corpus_run, tmp_path):
    """In a subprocess: a faiss reader that crashed would kill it with a signal."""
    _, _, _, out = corpus_run
    damaged = tmp_path / "index"
    shutil.copytree(out / "index", damaged)
    truncate_and_reseal(damaged, "shard-00000-of-00001.faiss", 0.5)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "score", "--features",
                           str(out / "features"), "--index", str(damaged), "--output",
                           str(tmp_path / "results")], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert ("dn2 score: error: index file shard-00000-of-00001.faiss is corrupt or truncated"
            in proc.stderr)
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------
# Tests: checks before any heavy work
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mismatches(corpus_run, tmp_path_factory):
    root, _, _, out = corpus_run
    return {m.label: m for m in prepare_mismatches(out, root, tmp_path_factory.mktemp("mm"))}


MISMATCH_LABELS = [
    "scoring with another backbone than the index's",
    "features made with other preprocessing (resize 288) than the index's",
    "features of dimension 512, index of 2560",
    "feature rows of dimension 512 under a marker that says 2560",
    "features directory without its _SUCCESS marker",
    "normal set where every image is bad",
    "normal set directory with no images",
    "normal set directory that does not exist",
    "index shard with one byte flipped",
    "index file shard-00000-of-00001.faiss cut to 50% of its bytes, checksum recomputed",
    "index file shard-00000-of-00001.faiss cut to 0% of its bytes, checksum recomputed",
    "index file normal.parquet cut to 50% of its bytes, checksum recomputed",
    "IVF index file ivf.faiss cut to 50% of its bytes, checksum recomputed",
    "index manifest (_SUCCESS) cut short",
    "--output is a features directory",
    "--output holds unrelated files",
    "dn2 run --output is a features directory",
    "dn2 run --output holds unrelated files",
    "weights file that would run code when unpickled",
    "truncated weights file",
]


def test_every_mismatch_is_listed(mismatches):
    assert sorted(mismatches) == sorted(MISMATCH_LABELS)


@pytest.mark.parametrize("label", MISMATCH_LABELS)
def test_mismatch_is_a_clear_error_before_heavy_work(label, mismatches, capsys):
    m = mismatches[label]
    capsys.readouterr()
    code = main(m.argv)
    err = capsys.readouterr().err
    assert code == 1, err
    command = m.argv[0]
    assert err.startswith(f"dn2 {command}: error: "), err
    for piece in m.expect:
        assert piece in err, err
    assert "Traceback" not in err
    if m.untouched is not None:
        assert not m.untouched.exists()
    if m.kept is not None:
        assert m.kept.read_text() == "someone else's data\n"
