"""Listing SRC: directories, globs and manifests on local and memory:// filesystems."""

from __future__ import annotations

import fsspec
import pytest

from dn2ops.io.sources import SourceError, list_source, read_manifest


@pytest.fixture
def store(tmp_path):
    for name in ("a.png", "b.JPG", "sub/c.webp", ".hidden.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_directory_lists_image_files_only_and_skips_hidden(store):
    uris = [r["uri"] for r in list_source(str(store))]
    assert uris == [str(store / "a.png"), str(store / "b.JPG"), str(store / "sub/c.webp")]


def test_glob_lists_every_match_so_bad_matches_are_reported(store):
    assert [r["uri"] for r in list_source(str(store / "*.txt"))] == [str(store / "notes.txt")]


def test_relative_manifest_uris_resolve_against_the_manifest_as_absolute_paths(
        store, monkeypatch):
    (store / "m.csv").write_text("uri,label\na.png,0\nsub/c.webp,1\n")
    monkeypatch.chdir(store.parent)
    rows = list(list_source(f"{store.name}/m.csv"))
    assert rows == [{"uri": str(store / "a.png"), "label": "0"},
                    {"uri": str(store / "sub/c.webp"), "label": "1"}]


def test_memory_filesystem_and_missing_source():
    fs = fsspec.filesystem("memory")
    fs.pipe("/src-test/x.png", b"1")
    assert [r["uri"] for r in list_source("memory://src-test")] == ["memory:///src-test/x.png"]
    fs.rm("/src-test", recursive=True)
    with pytest.raises(SourceError, match="does not exist"):
        list(list_source("memory://src-test-missing"))


def test_manifest_without_uri_column(tmp_path):
    (tmp_path / "m.csv").write_text("path\nx.png\n")
    with pytest.raises(SourceError, match="no 'uri' column"):
        list(list_source(str(tmp_path / "m.csv")))


def test_csv_and_parquet_manifests_read_as_they_stream_give_every_row(tmp_path):
    """Manifests are read as consumed (issue 19): across Parquet record batches and a CSV
    with a byte-order mark and CRLF lines, every row arrives once, in order, as str."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 10_000  # more than one Parquet record batch
    uris = [f"gs://b/i{i:05d}.png" for i in range(n)]
    lots = [None if i % 7 == 0 else f"lot{i % 3}" for i in range(n)]
    pq.write_table(pa.table({"uri": uris, "lot": lots}), tmp_path / "m.parquet",
                   row_group_size=3000)
    lines = ["uri,lot"] + [f"{u},{lot or ''}" for u, lot in zip(uris, lots, strict=True)]
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    want = [{"uri": u, "lot": lot or ""} for u, lot in zip(uris, lots, strict=True)]
    assert list(list_source(str(tmp_path / "m.parquet"))) == want
    assert list(list_source(str(tmp_path / "m.csv"))) == want


def test_list_images_stage_lists_a_directory(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from dn2ops.io.sources import ListImages
    from pipelines.options import LOCAL_RUNNER

    for name in ("a.png", "b.JPG", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    with TestPipeline(runner=LOCAL_RUNNER) as p:
        uris = p | ListImages(str(tmp_path)) | beam.Map(lambda r: r["uri"].rsplit("/", 1)[1])
        assert_that(uris, equal_to(["a.png", "b.JPG"]))


@pytest.mark.parametrize("name, data", [
    ("m.parquet", b"not parquet"),
    ("m.csv", "uri,lot\na.png,caf\xe9\n".encode("latin-1")),  # not UTF-8
])
def test_a_damaged_manifest_is_a_source_error(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(SourceError, match=f"manifest {tmp_path / name} cannot be read: "):
        list(read_manifest(str(tmp_path / name)))
