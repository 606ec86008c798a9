"""Tests for dn2ops.embed.images: every input is generated in memory with PIL."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from dn2ops.embed.images import ImageDecodeError, load_image, sha256_hex

SIZE = (7, 5)  # non-square (width, height) so a transposed result shows


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _palette_image(transparent: bool) -> Image.Image:
    """A P image: left 3 columns index 0 (red), the rest index 1 (blue)."""
    img = Image.new("P", SIZE, 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.paste(0, (0, 0, 3, SIZE[1]))
    if transparent:
        img.info["transparency"] = 0
    return img


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", SIZE, colour) for colour in ((255, 0, 0), (0, 0, 255))]
    return _encode(
        frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50
    )


def _png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is patched to declare width x height."""
    png = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    # Signature (8) + length (4) + b"IHDR" (4), then width and height.
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


MODE_CASES: dict[str, Callable[[], bytes]] = {
    "rgb-png": lambda: _encode(_noise(SIZE), "PNG"),
    "gray-L-png": lambda: _encode(Image.new("L", SIZE, 128), "PNG"),
    "1bit-png": lambda: _encode(Image.new("1", SIZE, 1), "PNG"),
    "palette-png": lambda: _encode(_palette_image(transparent=False), "PNG"),
    "palette-transparent-png": lambda: _encode(_palette_image(transparent=True), "PNG"),
    "LA-png": lambda: _encode(Image.new("LA", SIZE, (10, 200)), "PNG"),
    "RGBA-png": lambda: _encode(Image.new("RGBA", SIZE, (1, 2, 3, 100)), "PNG"),
    "PA-tiff": lambda: _encode(Image.new("PA", SIZE, (1, 100)), "TIFF"),
    "cmyk-jpeg": lambda: _encode(Image.new("CMYK", SIZE, (0, 255, 255, 0)), "JPEG"),
    "gray16-png": lambda: _encode(Image.new("I;16", SIZE, 4000), "PNG"),
    "int32-I-tiff": lambda: _encode(Image.new("I", SIZE, 70000), "TIFF"),
    "float-F-tiff": lambda: _encode(Image.new("F", SIZE, 0.25), "TIFF"),
    "animated-gif": _animated_gif,
    "rgb-tiff": lambda: _encode(_noise(SIZE), "TIFF"),
    "rgb-webp": lambda: _encode(_noise(SIZE), "WEBP", lossless=True),
    "rgba-webp": lambda: _encode(Image.new("RGBA", SIZE, (9, 9, 9, 0)), "WEBP"),
    "rgb-jpeg": lambda: _encode(_noise(SIZE), "JPEG"),
    "bmp": lambda: _encode(_noise(SIZE), "BMP"),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_mode_loads_as_rgb(case: str) -> None:
    img = load_image(MODE_CASES[case]())

    assert img.mode == "RGB"
    assert img.size == SIZE
    assert np.asarray(img).shape == (SIZE[1], SIZE[0], 3)


def test_accepts_bytearray_and_memoryview() -> None:
    data = MODE_CASES["rgb-png"]()

    assert (
        load_image(bytearray(data)).tobytes() == load_image(memoryview(data)).tobytes()
    )


def test_rgb_png_pixels_unchanged() -> None:
    src = _noise(SIZE, seed=3)

    assert np.array_equal(np.asarray(load_image(_encode(src, "PNG"))), np.asarray(src))


def test_exif_orientation_6_rotates_clockwise() -> None:
    # Stored 40x20, red 10x10 block in the top-left corner, rest black.
    # Orientation 6 means "rotate 90 degrees clockwise to display", which
    # moves the stored top-left corner to the displayed top-right corner.
    src = Image.new("RGB", (40, 20), (0, 0, 0))
    src.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(src, "JPEG", quality=95, exif=exif.tobytes())

    img = load_image(data)

    assert img.size == (20, 40)
    pixels = np.asarray(img).astype(int)
    assert np.abs(pixels[2, 17] - (255, 0, 0)).max() < 30  # top-right: red
    assert np.abs(pixels[2, 2]).max() < 30  # top-left: black
    assert np.abs(pixels[37, 17]).max() < 30  # bottom-right: black


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (257, 1), (32768, 128), (65535, 255)],
)
def test_16bit_png_scales_full_range(value: int, expected: int) -> None:
    src = Image.fromarray(np.full((3, 4), value, dtype=np.uint16))
    data = _encode(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")

    pixels = np.asarray(load_image(data)).astype(int)

    assert np.abs(pixels - expected).max() <= 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # Within [0, 65535]: treated as 16-bit samples.
        ([0, 32768, 65535], [0, 128, 255]),
        # Outside 16-bit range: min/max stretch.
        ([-1000, 0, 1000], [0, 128, 255]),
        ([100_000, 100_000, 100_000], [0, 0, 0]),
    ],
)
def test_int32_mode_i_scaling(values: list[int], expected: list[int]) -> None:
    src = Image.fromarray(np.array([values], dtype=np.int32))
    assert src.mode == "I"

    gray = np.asarray(load_image(_encode(src, "TIFF")))[0, :, 0].astype(int)

    assert np.abs(gray - expected).max() <= 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # Within [0, 1]: normalised intensities.
        ([0.0, 0.5, 1.0], [0, 128, 255]),
        # Outside [0, 1]: min/max stretch.
        ([-2.0, 0.0, 2.0], [0, 128, 255]),
        ([0.0, np.nan, 1.0], [0, 0, 255]),
    ],
)
def test_float_mode_f_scaling(values: list[float], expected: list[int]) -> None:
    src = Image.fromarray(np.array([values], dtype=np.float32))
    assert src.mode == "F"

    gray = np.asarray(load_image(_encode(src, "TIFF")))[0, :, 0].astype(int)

    assert np.abs(gray - expected).max() <= 1


def test_palette_transparency_composites_to_white() -> None:
    pixels = np.asarray(load_image(_encode(_palette_image(transparent=True), "PNG")))

    assert (pixels[:, :3] == (255, 255, 255)).all()  # transparent red -> white
    assert (pixels[:, 3:] == (0, 0, 255)).all()  # opaque blue stays


def test_palette_without_transparency_keeps_colours() -> None:
    pixels = np.asarray(load_image(_encode(_palette_image(transparent=False), "PNG")))

    assert (pixels[:, :3] == (255, 0, 0)).all()
    assert (pixels[:, 3:] == (0, 0, 255)).all()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("LA-png", (10 * 200 + 255 * 55) / 255),  # gray 10 at alpha 200/255
        ("RGBA-png", (1 * 100 + 255 * 155) / 255),  # channel ~1 at alpha 100/255
        ("rgba-webp", 255),  # fully transparent -> pure white
    ],
)
def test_alpha_composites_over_white(case: str, expected: float) -> None:
    pixels = np.asarray(load_image(MODE_CASES[case]())).astype(float)

    assert np.abs(pixels[..., 0] - expected).max() <= 2


def test_cmyk_jpeg_colours() -> None:
    # C=0, M=255, Y=255, K=0 is red.
    pixels = np.asarray(load_image(MODE_CASES["cmyk-jpeg"]())).astype(int)

    assert np.abs(pixels - (255, 0, 0)).max() < 10


def test_animated_gif_gives_first_frame() -> None:
    data = _animated_gif()
    assert Image.open(io.BytesIO(data)).n_frames == 2

    pixels = np.asarray(load_image(data))

    assert (pixels == (255, 0, 0)).all()


def _truncated(fmt: str, keep: float) -> bytes:
    data = _encode(_noise((64, 64)), fmt)
    return data[: int(len(data) * keep)]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", r"^empty file \(0 bytes\)$", id="zero-bytes"),
        pytest.param(
            _truncated("JPEG", 0.5), r"^truncated or corrupt image data", id="jpeg-half"
        ),
        pytest.param(
            _truncated("PNG", 0.5), r"^truncated or corrupt image data", id="png-half"
        ),
        pytest.param(
            _truncated("PNG", 0.05), r"^truncated or corrupt image data", id="png-5pct"
        ),
        pytest.param(
            _encode(Image.new("L", (4, 4)), "PNG")[:10],
            r"^truncated or corrupt image data: starts like a PNG file",
            id="png-header-only",
        ),
        pytest.param(
            b"hello, this is a plain text file\nwith two lines\n",
            r"^not an image: the file holds text \(starts with 'hello, this is",
            id="text",
        ),
        pytest.param(
            b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
            b"<body>gone</body></html>",
            r"^not an image: the file holds HTML text \(starts with '<!DOCTYPE html>",
            id="html",
        ),
        pytest.param(
            bytes(range(256)) * 4,
            r"^not an image: unrecognised format \(1024 bytes, starts with 00 01 02",
            id="binary-junk",
        ),
    ],
)
def test_bad_input_raises_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        load_image(data)


def test_text_snippet_is_truncated() -> None:
    with pytest.raises(ImageDecodeError) as info:
        load_image(b"x" * 500)

    assert str(info.value).endswith("(starts with '" + "x" * 40 + "'...)")


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (30000, 30000),  # beyond 2x PIL's limit: PIL raises DecompressionBombError
        (10000, 10000),  # between 1x and 2x: PIL only warns unless made an error
    ],
)
def test_decompression_bomb_header_is_refused(width: int, height: int) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError, match=r"^decompression bomb: "):
            load_image(_png_with_size(width, height))

    assert not [
        w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)
    ]


def test_own_pixel_limit_checked_before_decoding() -> None:
    data = _encode(_noise((20, 20)), "PNG")

    with pytest.raises(
        ImageDecodeError,
        match=r"^decompression bomb: declares 20x20 = 400 pixels, limit is 100$",
    ):
        load_image(data, max_pixels=100)
    assert load_image(data, max_pixels=400).size == (20, 20)


def test_warning_filters_are_restored() -> None:
    before = list(warnings.filters)

    load_image(MODE_CASES["rgb-png"]())

    assert warnings.filters == before


def test_decode_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="empty file"):
        load_image(b"")


def test_non_bytes_rejected() -> None:
    with pytest.raises(TypeError, match="expects bytes, got str"):
        load_image("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "digest"),
    [
        (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    ],
)
def test_sha256_hex(data: bytes, digest: str) -> None:
    assert sha256_hex(data) == digest


# --- decoding only the pixels needed (min_side) ---------------------------------------


def _photo_jpeg(size: tuple[int, int], quality: int = 90, **kwargs) -> bytes:
    """A real photograph (scikit-learn's), scaled to ``size``, as a JPEG."""
    from benchmarks.datasets import phone_photo

    return _encode(phone_photo(0, size=size), "JPEG", quality=quality, **kwargs)


@pytest.mark.parametrize(
    ("size", "min_side", "expected"),
    [
        # 4032x3024 / 256: 3024 // 256 = 11 -> the largest DCT scale, 1/8.
        ((4032, 3024), 256, (504, 378)),
        # 1000 // 256 = 3 -> 1/2; 1/4 would leave 250 < 256.
        ((1333, 1000), 256, (667, 500)),
        # Exactly 4x: 1/4 leaves the short side at the target.
        ((1024, 1024), 256, (256, 256)),
        # Below 2x the target: decoded in full.
        ((500, 400), 256, (500, 400)),
        # Portrait: the short side is the width.
        ((1200, 1600), 300, (300, 400)),
    ],
)
def test_jpeg_draft_takes_the_smallest_scale_keeping_the_short_side(size, min_side, expected):
    img = load_image(_photo_jpeg(size), min_side=min_side)

    assert img.mode == "RGB" and img.size == expected
    assert min(img.size) >= min_side


def test_draft_decoding_stays_close_to_full_decoding():
    data = _photo_jpeg((2048, 1536))
    full = load_image(data)
    draft = load_image(data, min_side=256)
    assert draft.size == (512, 384)  # 1536 // 256 = 6 -> 1/4

    # Both brought to the draft's size: the DCT-domain scaling is a fair downscale.
    diff = np.abs(np.asarray(full.resize(draft.size, Image.BILINEAR), float)
                  - np.asarray(draft, float))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 12


@pytest.mark.parametrize("case", sorted(c for c in MODE_CASES if not c.endswith("jpeg")))
def test_every_mode_is_converted_as_before_then_reduced(case: str) -> None:
    # 7x5 with min_side 1: short side 5 // (2 x 1) = 2 -> reduced by 2, after the
    # RGB conversion, so modes (16-bit, palette, alpha...) convert exactly as before.
    data = MODE_CASES[case]()

    reduced = load_image(data, min_side=1)

    assert reduced.mode == "RGB" and reduced.size == (4, 3)
    assert reduced.tobytes() == load_image(data).reduce(2).tobytes()


@pytest.mark.parametrize("case", ["rgb-jpeg", "cmyk-jpeg"])
def test_jpeg_modes_load_as_rgb_with_draft(case: str) -> None:
    img = load_image(MODE_CASES[case](), min_side=2)

    assert img.mode == "RGB" and min(img.size) >= 2


def test_cmyk_jpeg_colours_with_draft() -> None:
    data = _encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")

    img = load_image(data, min_side=8)

    assert img.size == (16, 12)  # 48 // 8 = 6 -> 1/4
    assert np.abs(np.asarray(img).astype(int) - (255, 0, 0)).max() < 10


def test_exif_orientation_with_draft() -> None:
    # As test_exif_orientation_6_rotates_clockwise, decoded at 1/2 scale.
    src = Image.new("RGB", (80, 40), (0, 0, 0))
    src.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(src, "JPEG", quality=95, exif=exif.tobytes())

    img = load_image(data, min_side=16)

    assert img.size == (20, 40)  # stored 40x20 after 1/2, then rotated
    pixels = np.asarray(img).astype(int)
    assert np.abs(pixels[2, 17] - (255, 0, 0)).max() < 40  # top-right: red
    assert np.abs(pixels[2, 2]).max() < 40  # top-left: black
    assert np.abs(pixels[37, 17]).max() < 40  # bottom-right: black


@pytest.mark.parametrize(("size", "expected"), [((1100, 700), (275, 175)), ((700, 150), None)])
def test_png_is_reduced_by_an_integer_factor(size, expected) -> None:
    data = _encode(_noise(size), "PNG")

    img = load_image(data, min_side=80)

    # 700 // (2 x 80) = 4; 150 // 160 = 0: left alone.
    assert img.size == (expected or size)
    assert img.tobytes() == (load_image(data).reduce(4) if expected else
                             load_image(data)).tobytes()


def test_small_images_are_untouched_by_min_side() -> None:
    data = MODE_CASES["rgb-png"]()

    assert load_image(data, min_side=256).tobytes() == load_image(data).tobytes()


def test_bomb_check_uses_the_declared_size_even_with_draft() -> None:
    data = _encode(_noise((40, 30)), "JPEG")

    with pytest.raises(ImageDecodeError, match=r"declares 40x30 = 1200 pixels, limit is 1000"):
        load_image(data, max_pixels=1000, min_side=4)


def test_min_side_must_be_positive() -> None:
    with pytest.raises(ValueError, match="min_side must be positive"):
        load_image(MODE_CASES["rgb-png"](), min_side=0)
