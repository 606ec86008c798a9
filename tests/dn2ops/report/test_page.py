"""The rendered page: its sections, embedded images and numbers, escaping, and writing it."""

import base64
import io
import json
import re
from importlib import resources
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from dn2ops.report import render_report, write_report
from dn2ops.report.page import TEMPLATE
from tests.conftest import ALPHA, K, ParsedPage, make_images, make_results_dir, mark_cleaned

_THUMB_RE = re.compile(r'<img class="thumb" src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')
_ANY_DATA_RE = re.compile(r'src="data:image/(jpeg|png);base64,([A-Za-z0-9+/=]+)"')
_PLACEHOLDER = 'class="thumb missing"'
PAYLOADS = ("<script>document.title='pwned'</script>",
            "\"><img src=x onerror=\"document.title='pwned'\">")


def section_ids(doc: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', doc)


def section(doc: str, name: str) -> str:
    return doc.split(f'<section id="{name}">')[1].split("</section>")[0]


@pytest.fixture
def small(tmp_path):
    return make_results_dir(tmp_path, 100)


def test_sections_and_thumbnail_count(small):
    doc = render_report(small["results"], index_dir=small["index"], top=5, sample=10)
    assert section_ids(doc) == ["summary", "histogram", "top", "sample", "groups", "roc", "errors"]
    nav = re.search(r"<nav>(.*)</nav>", doc).group(1)
    assert re.findall(r'href="#(\w+)"', nav) == section_ids(doc)
    group_thumbs = 4 + 4 * 2  # first group capped at 4 members, four groups of 2
    assert len(_THUMB_RE.findall(doc)) == 5 * (1 + K) + 10 + group_thumbs
    assert _PLACEHOLDER not in doc
    # histogram + ROC curve
    assert doc.count('<img class="plot" src="data:image/png;base64,') == 2
    assert "http://" not in doc and "https://" not in doc  # nothing external
    assert "<script" not in doc and "&lt;script&gt;x&lt;/script&gt;" in doc


def test_every_embedded_image_decodes(small):
    doc = render_report(small["results"], index_dir=small["index"], top=3, sample=5)
    payloads = _ANY_DATA_RE.findall(doc)
    assert len(payloads) == 3 * (1 + K) + 5 + (4 + 2 + 2) + 2  # 3 groups shown
    for fmt, data in payloads:
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        assert image.format == fmt.upper()
        assert image.width > 0 and image.height > 0


def test_thumbnails_fit_thumb_px(tmp_path):
    images = make_images(tmp_path / "big", 1)
    Image.new("RGB", (400, 200), "red").save(images[0])
    paths = make_results_dir(tmp_path / "r", 10, groups=False)
    shard = Path(paths["results"]) / "anomalies-00000-of-00002.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.set_column(0, "uri", pa.array(images * len(table))), shard)
    doc = render_report(paths["results"], top=10, sample=0, thumb_px=50)
    sizes = {Image.open(io.BytesIO(base64.b64decode(d))).size for d in _THUMB_RE.findall(doc)}
    assert (50, 25) in sizes
    assert all(max(s) <= 50 for s in sizes)
    assert "width: 50px; height: 50px;" in doc


def test_top_rows_are_the_highest_ranked_with_neighbours(small):
    top = section(render_report(small["results"], top=4, sample=0), "top")
    shown = re.findall(r"<tr><td class='num'>(\d+)</td>", top)
    assert [int(r) for r in shown] == [1, 2, 3, 4]
    assert top.count('<figure class="anomaly">') == 4
    assert top.count('<figure class="neighbor">') == 4 * K
    best = int(np.argmax(small["scores"]))
    assert f"<td class='num'>{small['scores'][best]:.4g}</td>" in top
    assert f"label: {small['labels'][best]}</div>" in top


def test_flagged_rows_come_first_and_one_sentence_says_what_the_flag_means(small):
    flagged = int((np.array(small["p_values"]) <= ALPHA).sum())
    assert 0 < flagged < 25
    top = section(render_report(small["results"], top=25, sample=0), "top")
    assert top.count(">flagged</figcaption>") == flagged
    assert top.count(">anomaly</figcaption>") == 25 - flagged
    lowest = np.sort(small["scores"])[-flagged]
    assert (f"<p id=\"flags\">Flagged: p-value &lt;= 0.01: a normal image is flagged with "
            f"chance 1 %; {flagged} flagged (scores &gt;= {lowest:.4g}).</p>") in top


def test_missing_and_corrupt_images_give_placeholders(small, tmp_path):
    path = Path(small["results"]) / "anomalies-00000-of-00002.parquet"
    table = pq.read_table(path)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    uris = [str(tmp_path / "gone.png")] * len(table)
    uris[0] = str(corrupt)
    pq.write_table(table.set_column(0, "uri", pa.array(uris)), path)
    doc = render_report(small["results"], top=100, sample=0)  # every row is in the top
    assert doc.count(_PLACEHOLDER) == len(uris)
    assert "file not found" in doc
    assert "corrupt" in doc.lower()
    assert len(_THUMB_RE.findall(doc)) == 100 * K + 100 - len(uris) + 12


def test_roc_auc_matches_sklearn(small):
    doc = render_report(small["results"], top=1, sample=0)
    expected = roc_auc_score(small["labels"], small["scores"])
    match = re.search(r"id='roc-auc'>([0-9.]+)<", doc)
    assert match and match.group(1) == f"{expected:.4f}"
    n_pos = int(small["labels"].sum())
    assert f"{n_pos:,} anomalous, {100 - n_pos:,} normal, 0 without" in section(doc, "roc")


def test_optional_sections_absent(tmp_path):
    paths = make_results_dir(tmp_path, 20, groups=False, label=False)
    doc = render_report(paths["results"], top=2, sample=2)
    assert section_ids(doc) == ["summary", "histogram", "top", "sample", "errors"]
    assert re.findall(r'href="#(\w+)"', doc) == section_ids(doc)


def test_single_class_labels_do_not_crash(tmp_path):
    paths = make_results_dir(tmp_path, 20, groups=False)
    for shard in Path(paths["results"]).glob("anomalies-*.parquet"):
        table = pq.read_table(shard)
        idx = table.schema.get_field_index("label")
        pq.write_table(table.set_column(idx, "label", pa.array([0] * len(table))), shard)
    doc = render_report(paths["results"], top=1, sample=0)
    assert "roc" in section_ids(doc)
    assert "roc-auc" not in doc and "needs both" in doc


def test_summary_contents(small):
    summary = section(render_report(small["results"], index_dir=small["index"], top=1, sample=0),
                      "summary")
    for text in ("count_in", "103", "scored", "100", "errored", "efficientnet_lite0",
                 "idx-abc", "2024-06-01", "total_s", "12.5 s", "decode", "empty file (0 bytes)"):
        assert text in summary, text


def test_sample_is_deterministic_and_counted(small):
    a = render_report(small["results"], top=2, sample=7)
    assert a == render_report(small["results"], top=2, sample=7)
    assert "7 of the other 98 scored images (seed 0, at most 7)" in section(a, "sample")


def test_histogram_notes_where_the_normal_scores_came_from(small, tmp_path):
    assert f"normal set: {small['index']}" in render_report(small["results"], top=0, sample=0)
    summary_path = Path(small["results"]) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["index_dir"] = str(tmp_path / "nowhere")
    summary_path.write_text(json.dumps(summary))
    doc = render_report(small["results"], top=0, sample=0)
    assert "not usable here" in section(doc, "histogram")
    assert section(doc, "histogram").count('<img class="plot"') == 1  # the partition alone


def test_errors_table_capped(tmp_path):
    paths = make_results_dir(tmp_path, 10, groups=False, n_errors=620)
    errors = section(render_report(paths["results"], top=0, sample=0), "errors")
    assert errors.count("<tr><td class='uri'>") == 500
    assert "120 more errors not shown" in errors


def test_payloads_in_every_field_show_as_text(tmp_path):
    """Each value from users' data is escaped: no element or attribute comes from it."""
    paths = make_results_dir(tmp_path, 12, n_errors=2)
    script, img = PAYLOADS
    named = Path(paths["images"][0]).with_name(img + ".png")  # a real file of that name
    Path(paths["images"][0]).rename(named)
    for shard in Path(paths["results"]).glob("anomalies-*.parquet"):
        table = pq.read_table(shard)
        n = len(table)
        table = table.set_column(0, "uri", pa.array([str(named)] * n))
        table = table.set_column(table.schema.get_field_index("label"), "label",
                                 pa.array([script, img] * (n // 2)))
        pq.write_table(table, shard)
    results = Path(paths["results"])
    pq.write_table(pa.table({"uri": [script, img], "stage": [img, script],
                             "error": [script, img]}), results / "errors-00000-of-00001.parquet")
    pq.write_table(pa.table({"group": [script, img], "score": [2.0, 1.0], "rank": [1, 2],
                             "size": [1, 1], "member_uris": [[str(named)], [paths["images"][1]]],
                             "neighbor_groups": [[img, script], [script]]}),
                   results / "groups-00000-of-00001.parquet")
    page_html = render_report(paths["results"], top=12, sample=0)
    page = ParsedPage(page_html)
    assert page.tags("script") == []
    assert [a for _, a in page.elements if "onerror" in a] == []
    assert {a["src"][:15] for a in page.tags("img")} == {"data:image/jpeg", "data:image/png;"}
    thumbs = [a for a in page.tags("img") if a["class"] == "thumb"]
    assert len(thumbs) == 12 * (1 + K) + 2  # top rows and neighbours, group members
    assert [a["alt"] for a in thumbs].count(str(named)) == 12 + 1
    assert all(a["alt"] == a["title"] for a in thumbs)
    text = "".join(page.text)
    assert text.count(f"label: {script}") == 6 and text.count(f"label: {img}") == 6
    assert text.count(str(named)) == 12  # the uri under each top row
    errors, groups = section(page_html, "errors"), section(page_html, "groups")
    assert "".join(ParsedPage(errors).text).count(script + img + script) == 1  # one error row
    assert "".join(ParsedPage(groups).text).count(f"{img}, {script}") == 1


def test_template_ships_with_the_package_and_marks_nothing_safe():
    template = resources.files("dn2ops.report").joinpath("templates", TEMPLATE)
    source = template.read_text(encoding="utf-8")
    assert "|safe" not in source.replace(" ", "") and "autoescape" not in source


def test_write_report_local_default_path(small):
    path = write_report(small["results"], top=2, sample=2)
    assert path == small["results"] + "/report.html"
    assert Path(path).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # written under a temp name and moved: nothing else left behind
    assert sorted(p.name for p in Path(small["results"]).glob("*report*")) == ["report.html"]


def test_write_report_memory_filesystem(small):
    fs = fsspec.filesystem("memory")
    fs.put(small["results"], "/dn2-report-test/results", recursive=True)
    try:
        path = write_report("memory://dn2-report-test/results", top=2, sample=2)
        assert path == "memory://dn2-report-test/results/report.html"
        assert fs.cat_file("/dn2-report-test/results/report.html").startswith(b"<!DOCTYPE")
        out = write_report("memory://dn2-report-test/results",
                           "memory://dn2-report-test/out/r.html", top=1, sample=0)
        assert fs.exists(out) and fs.ls("/dn2-report-test/out", detail=False) == [
            "/dn2-report-test/out/r.html"]
    finally:
        fs.rm("/dn2-report-test", recursive=True)


def test_report_size_is_bounded(tmp_path):
    sizes = {}
    for n in (2000, 50000):
        paths = make_results_dir(tmp_path / str(n), n)
        sizes[n] = len(render_report(paths["results"], index_dir=paths["index"]).encode())
    print(f"\nreport size: 2000 rows -> {sizes[2000]:,} B, 50000 rows -> {sizes[50000]:,} B")
    assert abs(sizes[50000] - sizes[2000]) / sizes[2000] < 0.03


@pytest.mark.parametrize(("top", "sample", "thumb_px"), [(-1, 0, 96), (0, -1, 96), (1, 1, 0)])
def test_bad_sizes(small, top, sample, thumb_px):
    with pytest.raises(ValueError, match=">= "):
        render_report(small["results"], top=top, sample=sample, thumb_px=thumb_px)


def test_removed_normal_images_are_shown_most_suspicious_first(tmp_path):
    paths = make_results_dir(tmp_path, 20, groups=False)
    removed = mark_cleaned(paths["index"], paths["images"], 30)
    doc = render_report(paths["results"], top=2, sample=0)
    assert section_ids(doc) == ["summary", "histogram", "top", "sample", "roc", "removed",
                                "errors"]
    part = section(doc, "removed")
    assert "The auto rule removed 30 of 40 normal images (estimated contamination 75.0 %)" \
        in part and "(threshold 3.5; 2 round(s))" in part
    assert f"{paths['index']}/normal.parquet</span> (kept = false)" in part
    assert "24 of the 30 removed images, most suspicious" in part
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", part)
    assert captions == [f"{s:.4g}" for s, _ in removed[:24]]  # capped, highest first
    assert len(_THUMB_RE.findall(part)) == 24 and _PLACEHOLDER not in part
    assert re.findall(r'alt="([^"]*)"', part) == [u for _, u in removed[:24]]


def test_removed_section_says_where_the_list_is_when_the_index_cannot_be_read(small, tmp_path):
    summary_path = Path(small["results"]) / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["index_dir"] = str(tmp_path / "nowhere")
    summary_path.write_text(json.dumps(summary))
    part = section(render_report(small["results"], top=0, sample=0), "removed")
    assert "could not be read here" in part and "<img" not in part
    assert f"{tmp_path / 'nowhere'}/normal.parquet</span> (kept = false)" in part


def test_an_index_that_was_not_cleaned_has_no_removed_section(small):
    assert "removed" not in section_ids(render_report(small["results"], top=0, sample=0))
