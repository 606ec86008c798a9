"""Thumbnails: real images shrunk to fit, and a reason for each one that cannot be read."""

import base64
import io

from PIL import Image

from dn2ops.report.thumbs import MAX_REASON_CHARS, Thumb, make_thumbs, reason, thumb


def _decoded(t: Thumb) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert t.data_uri.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(t.data_uri[len(prefix):])))
    image.load()
    return image


def test_thumbnails_fit_the_box_and_keep_the_aspect(tmp_path):
    Image.new("RGB", (400, 200), "red").save(tmp_path / "wide.png")
    Image.new("L", (20, 30), 128).save(tmp_path / "small.png")
    thumbs = make_thumbs([str(tmp_path / "wide.png"), str(tmp_path / "small.png")], 50)
    wide, small = (_decoded(thumbs[str(tmp_path / n)]) for n in ("wide.png", "small.png"))
    assert wide.format == "JPEG" and wide.size == (50, 25)
    assert small.size == (20, 30)  # never enlarged
    red = wide.convert("RGB").getpixel((25, 12))
    assert red[0] > 240 and red[1] < 20 and red[2] < 20


def test_unreadable_images_give_reasons(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    thumbs = make_thumbs([str(tmp_path / "gone.png"), str(corrupt)], 32)
    assert thumbs[str(tmp_path / "gone.png")] == Thumb(None, "file not found")
    assert thumbs[str(corrupt)].data_uri is None and thumbs[str(corrupt)].reason
    assert thumbs["never asked for"] == Thumb(None, "not loaded")
    assert make_thumbs([], 32) == {}


def test_reasons_are_capped():
    text = reason(ValueError("x" * 1000))
    assert len(text) == MAX_REASON_CHARS and text.endswith("…")
    assert reason(RuntimeError()) == "RuntimeError"


def test_one_thumbnail(tmp_path):
    Image.new("RGB", (10, 10), "blue").save(tmp_path / "b.png")
    assert _decoded(thumb(str(tmp_path / "b.png"), 96)).size == (10, 10)
