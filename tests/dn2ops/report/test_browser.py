"""The report in headless Chromium: it loads, every image decodes, and data never runs as code.

Needs the Debian package ``chromium`` (``make setup`` installs it); skipped with
that reason when /usr/bin/chromium is missing. Leaves a screenshot at
``test-artifacts/report.png`` (gitignored).
"""

import re
import shutil
from pathlib import Path

import pytest
from markupsafe import escape

from benchmarks.datasets import write_manifest, write_png_store
from dn2ops.report import write_report
from pipelines.cli import main
from tests.conftest import K, ParsedPage, digit_images, make_results_dir, mark_cleaned

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"

# Counts decoded images once everything (data: URIs included) has loaded and
# reports through the title, which --dump-dom prints.
_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const ids = Array.from(document.querySelectorAll('section')).map(s => s.id).join(',');
  document.title = 'decoded=' + ok + '/' + imgs.length + ' sections=' + ids;
});
</script>"""

# Each payload, if it ever ran, would mark the page's root element with its own name.
LABEL_SCRIPT = "<script>document.documentElement.dataset.pwned='label-script'</script>"
LABEL_IMG = "\"><img src=x onerror=\"document.documentElement.dataset.pwned='label-img'\">"
# A file name cannot hold '/', so no '</script>'; its <img> breaks out of an attribute.
FILE_NAME = "<script>\"><img src=x onerror=\"document.documentElement.dataset.pwned='file'\">"


def pwned(page: ParsedPage) -> list[str]:
    """The marks left by payloads that ran."""
    return [a["data-pwned"] for _, a in page.elements if "data-pwned" in a]


@pytest.fixture
def report(tmp_path, chromium):
    paths = make_results_dir(tmp_path / "data", 300)
    return Path(write_report(paths["results"], index_dir=paths["index"], top=6, sample=24))


def test_report_renders_and_all_images_decode(report, tmp_path, chromium):
    probed = tmp_path / "probed.html"
    probed.write_text(
        report.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
        encoding="utf-8",
    )
    result = chromium("--dump-dom", probed.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", result.stdout)
    assert title, result.stdout[:500]
    match = re.fullmatch(r"decoded=(\d+)/(\d+) sections=(.*)", title.group(1))
    assert match, f"probe did not run: title {title.group(1)!r}"
    decoded, total, ids = int(match.group(1)), int(match.group(2)), match.group(3)
    # top rows with neighbours + sample + group members (4 + 2*4) + 2 plots
    assert total == 6 * (1 + K) + 24 + 12 + 2
    assert decoded == total
    assert ids == "summary,histogram,top,sample,groups,roc,errors"


def test_report_screenshot(report, tmp_path, chromium):
    shot = tmp_path / "report.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report.png")


def test_removed_normal_images_render_and_decode(tmp_path, chromium):
    """An index whose cleaning removed 30 normal images: the section shows 24 of them, every
    thumbnail decodes; a screenshot of it is left at test-artifacts/report-removed.png."""
    paths = make_results_dir(tmp_path / "data", 40, groups=False)
    mark_cleaned(paths["index"], paths["images"], 30)
    page = Path(write_report(paths["results"], top=2, sample=0))
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                      encoding="utf-8")
    result = chromium("--dump-dom", probed.as_uri())
    match = re.search(r"<title>decoded=(\d+)/(\d+) sections=(.*?)</title>", result.stdout)
    assert match, result.stdout[:500]
    assert match.group(1) == match.group(2) == str(2 * (1 + K) + 24 + 2)  # top, removed, plots
    assert match.group(3) == "summary,histogram,top,sample,roc,removed,errors"
    dom = ParsedPage(result.stdout)
    assert "Removed from the normal set" in dom.text
    # The page's head and that section alone: the screenshot shows it.
    html = page.read_text(encoding="utf-8")
    alone = tmp_path / "alone.html"
    alone.write_text(html.split("<body>")[0] + "<body>" + re.search(
        r'<section id="removed">.*?</section>', html, re.S).group(0) + "</body></html>",
        encoding="utf-8")
    shot = tmp_path / "removed.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1000,560", alone.as_uri())
    assert result.returncode == 0 and shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report-removed.png")


@pytest.fixture
def payload_store(tmp_path):
    """A store whose manifest labels and file names are HTML payloads.

    incoming.csv: 30 images, labels alternating the two payloads (so each is
    in the top 20 at least 5 times); one real PNG named FILE_NAME, and a corrupt
    file of that name (it lands in the errors table, shown as text).
    """
    normal, incoming, _ = digit_images()
    write_png_store(normal, [f"n{i:03d}" for i in range(len(normal))], str(tmp_path / "normal"))
    names = [f"i{i:03d}" for i in range(len(incoming))]
    write_png_store(incoming, names, str(tmp_path / "incoming"))
    (tmp_path / "incoming" / "i000.png").rename(tmp_path / "incoming" / f"{FILE_NAME}.png")
    names[0] = FILE_NAME
    (tmp_path / "incoming" / f"{FILE_NAME} corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n bad")
    names.append(f"{FILE_NAME} corrupt")
    labels = [(LABEL_SCRIPT, LABEL_IMG)[i % 2] for i in range(len(names))]
    write_manifest([{"uri": f"incoming/{n}.png", "label": y}
                    for n, y in zip(names, labels, strict=True)], str(tmp_path / "incoming.csv"))
    return tmp_path


def test_payloads_in_manifest_and_file_names_do_not_run(payload_store, tmp_path, chromium):
    out = tmp_path / "out"
    assert main(["run", "--normal", str(payload_store / "normal"),
                 "--input", str(payload_store / "incoming.csv"),
                 "--output", str(out), "--report"]) == 0
    page = out / "results" / "report.html"
    result = chromium("--dump-dom", page.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = ParsedPage(result.stdout)
    assert pwned(dom) == []  # no payload ran
    assert dom.title == "DN2 anomaly report: " + str(out / "results")
    assert dom.tags("script") == []
    assert all(a["src"].startswith("data:image/") for a in dom.tags("img"))
    # ... and each shows as written: in text, and in the thumbnails' alt and title.
    text = "".join(dom.text)
    assert text.count(f"label: {LABEL_SCRIPT}") >= 5 and text.count(f"label: {LABEL_IMG}") >= 5
    named = str(payload_store / "incoming" / FILE_NAME)
    assert f"{named} corrupt.png" in text  # the errors table
    assert [a["title"] for a in dom.tags("img") if a.get("alt") == f"{named}.png"] == [
        f"{named}.png"]

    # The check can fail: the same page with one value left unescaped runs it.
    html = page.read_text(encoding="utf-8")
    for raw, marks in ((LABEL_SCRIPT, "label-script"), (LABEL_IMG, "label-img"),
                       (f"{named}.png", "file")):
        assert str(escape(raw)) in html
        control = tmp_path / f"control-{marks}.html"
        control.write_text(html.replace(str(escape(raw)), raw, 1), encoding="utf-8")
        ran = ParsedPage(chromium("--dump-dom", control.as_uri()).stdout)
        assert pwned(ran) == [marks], marks
