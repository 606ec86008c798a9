"""dn2 embed --reuse: a half-new directory of real images, against an earlier features
directory; the copied rows, the new rows and the refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dn2ops.config import DEFAULT_BACKBONE
from dn2ops.io.features import embeddings, read_table
from pipelines.cli import main


def _rows(features_dir) -> dict[str, dict]:
    """uri -> row (embedding a float32 array) of a features directory."""
    table = read_table(str(features_dir), "features")
    X = embeddings(table)
    rest = table.drop_columns(["embedding"]).to_pylist()
    return {r["uri"]: {**r, "embedding": x} for r, x in zip(rest, X, strict=True)}


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tamper(features_dir) -> None:
    """Rewrites a features directory's shards with embeddings no backbone makes
    (row i of a shard: i + 0.5 everywhere), keeping its marker valid."""
    marker_path = features_dir / "_SUCCESS"
    marker = json.loads(marker_path.read_text())
    for entry in marker["committed_files"]:
        if not entry["name"].startswith("features-"):
            continue
        path = features_dir / entry["name"]
        table = pq.read_table(path)
        n, dim = table.num_rows, marker["dim"]
        X = np.repeat(np.arange(n, dtype=np.float32)[:, None] + 0.5, dim, axis=1)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), dim)
        table = table.set_column(table.schema.get_field_index("embedding"), "embedding",
                                 emb.cast(pa.list_(pa.float32())))
        pq.write_table(table, path)
        entry["size"] = path.stat().st_size
    marker_path.write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def half_new(digit_store, tmp_path_factory):
    """earlier/: dn2 embed of the normal images, its embeddings tampered so that a copied
    row is told from an embedded one. half/: half of those files (same bytes, new
    names), one of them twice, half of the incoming images (new), one broken file, and
    a manifest with a column of its own."""
    root = tmp_path_factory.mktemp("reuse")
    earlier = root / "earlier"
    assert main(["embed", "--input", str(digit_store / "normal"),
                 "--output", str(earlier)]) == 0
    _tamper(earlier)
    half = root / "half"
    half.mkdir()
    normal = sorted((digit_store / "normal").glob("*.png"))
    incoming = sorted((digit_store / "incoming").glob("*.png"))
    known = normal[: len(normal) // 2]
    for i, p in enumerate(known):
        shutil.copy(p, half / f"old-{i:03d}.png")
    shutil.copy(known[0], half / "old-again.png")  # the same bytes under a second name
    for i, p in enumerate(incoming[: len(incoming) // 2]):
        shutil.copy(p, half / f"new-{i:03d}.png")
    (half / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    names = sorted(p.name for p in half.iterdir())
    (root / "half.csv").write_text(
        "uri,batch\n" + "".join(f"half/{n},b{i}\n" for i, n in enumerate(names)))
    out = root / "reused"
    assert main(["embed", "--input", str(root / "half.csv"), "--output", str(out),
                 "--reuse", str(earlier)]) == 0
    fresh = root / "fresh"
    assert main(["embed", "--input", str(root / "half.csv"), "--output", str(fresh)]) == 0
    return {"root": root, "earlier": earlier, "half": half, "out": out, "fresh": fresh,
            "n_known": len(known) + 1, "n_new": len(incoming) // 2}


def test_known_images_are_copied_new_ones_embedded(half_new):
    out, fresh = _rows(half_new["out"]), _rows(half_new["fresh"])
    earlier = {r["sha256"]: r["embedding"] for r in _rows(half_new["earlier"]).values()}
    assert set(out) == set(fresh)  # the same images, under the new names
    copied = [u for u, r in out.items() if r["sha256"] in earlier]
    assert len(copied) == half_new["n_known"]
    for u in copied:  # the tampered vectors: copied, never embedded
        np.testing.assert_array_equal(out[u]["embedding"], earlier[out[u]["sha256"]])
    new = [u for u in out if u not in copied]
    assert len(new) == half_new["n_new"]
    for u in new:  # embedded like a run without --reuse
        scale = np.abs(fresh[u]["embedding"]).max()
        np.testing.assert_allclose(out[u]["embedding"], fresh[u]["embedding"],
                                   atol=1e-4 * scale, rtol=0)
    for u, r in out.items():  # the sha256 and the manifest's column are this run's
        assert r["sha256"] == _sha256(Path(u))
        assert r["batch"] == fresh[u]["batch"]


def test_every_input_is_accounted_for_and_the_marker_says_what_was_copied(half_new):
    marker = json.loads((half_new["out"] / "_SUCCESS").read_text())
    n_in = half_new["n_known"] + half_new["n_new"] + 1
    assert marker["count_in"] == n_in
    assert marker["embedded"] + marker["errored"] == n_in
    assert marker["errored"] == 1  # broken.png: not known, so tried, and reported
    assert marker["reused"] == {"from": str(half_new["earlier"]),
                                "images": half_new["n_known"]}
    errors = read_table(str(half_new["out"]), "errors").to_pylist()
    assert [e["uri"].rsplit("/", 1)[-1] for e in errors] == ["broken.png"]
    earlier = json.loads((half_new["earlier"] / "_SUCCESS").read_text())
    assert marker["weights_sha256"] == earlier["weights_sha256"]
    assert len(marker["weights_sha256"]) == 64


def test_other_weights_are_refused(half_new, capsys):
    code = main(["embed", "--input", str(half_new["half"]),
                 "--output", str(half_new["root"] / "refused"),
                 "--reuse", str(half_new["earlier"]), "--weights", "random"])
    assert code == 1
    err = capsys.readouterr().err
    assert "embedded with other weights" in err
    assert not (half_new["root"] / "refused").exists()


def test_another_backbone_is_refused(half_new, capsys):
    code = main(["embed", "--input", str(half_new["half"]),
                 "--output", str(half_new["root"] / "refused"),
                 "--reuse", str(half_new["earlier"]), "--backbone", "resnet18",
                 "--weights", "random"])
    assert code == 1
    err = capsys.readouterr().err
    assert f"backbone: this run 'resnet18', --reuse '{DEFAULT_BACKBONE}'" in err


def test_a_directory_without_weights_sha256_is_refused(half_new, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(half_new["earlier"], old)
    marker = json.loads((old / "_SUCCESS").read_text())
    del marker["weights_sha256"]
    (old / "_SUCCESS").write_text(json.dumps(marker))
    code = main(["embed", "--input", str(half_new["half"]), "--output", str(tmp_path / "o"),
                 "--reuse", str(old)])
    assert code == 1
    assert "records no weights_sha256" in capsys.readouterr().err
