"""Render the report in headless Chromium: the page loads and every image decodes.

Needs the Debian package ``chromium``; skipped when /usr/bin/chromium is
missing. Leaves a screenshot at ``test-artifacts/report.png`` (gitignored).
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dn2ops.report import write_report
from tests.dn2ops.test_report import K, make_results_dir

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_S = 60
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

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


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


@pytest.fixture
def report(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found: install the Debian package 'chromium'")
    paths = make_results_dir(tmp_path / "data", 300)
    return Path(write_report(paths["results"], index_dir=paths["index"], top=6, sample=24))


def test_report_renders_and_all_images_decode(report, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(
        report.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
        encoding="utf-8",
    )
    result = _chromium(tmp_path, "--dump-dom", probed.as_uri())
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


def test_report_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    result = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report.png")
