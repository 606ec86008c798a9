"""Heatmap overlays for the report's top images: each row's 16-bit heatmap PNG
(dn2ops.score.heatmaps, ``heatmap_uri`` relative to the results directory) as a
coloured, partly transparent thumbnail drawn over the image, its ``hot_box`` outlined.

The heatmaps share the run's scale, so a faint overlay is a cooler image than a bright
one: colours compare across rows.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from dn2ops.io import outputs

# Opacity of the hottest pixel; cold pixels are transparent.
MAX_ALPHA = 0.7
BOX_COLOUR = (0, 255, 255, 255)


def overlay_png(heatmap: bytes, hot_box: Sequence[int] | None, thumb_px: int) -> bytes:
    """A 16-bit heatmap PNG -> an RGBA PNG fitting ``thumb_px`` x ``thumb_px`` (the
    thumbnail's fit: same aspect as the image), coloured (inferno), alpha by heat,
    with ``hot_box`` (x0, y0, x1, y1 in the image's pixels) outlined."""
    image = Image.open(io.BytesIO(heatmap))
    width, height = image.size
    values = Image.fromarray(np.asarray(image, np.float32) / 65535.0, mode="F")
    values.thumbnail((thumb_px, thumb_px))
    v = np.clip(np.asarray(values), 0.0, 1.0)
    rgba = colormaps["inferno"](v)
    rgba[..., 3] = MAX_ALPHA * v
    out = Image.fromarray(np.round(rgba * 255).astype(np.uint8), mode="RGBA")
    if hot_box:
        sx, sy = out.size[0] / width, out.size[1] / height
        x0, y0, x1, y1 = hot_box
        ImageDraw.Draw(out).rectangle([x0 * sx, y0 * sy, max(x0 * sx, x1 * sx - 1),
                                       max(y0 * sy, y1 * sy - 1)], outline=BOX_COLOUR)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def make_overlays(results_dir: str, rows: Sequence[Mapping[str, Any]], thumb_px: int
                  ) -> dict[str, str]:
    """uri -> the overlay's data: URI, for the rows with a heatmap; a heatmap that cannot
    be read is left out (the image shows without one)."""
    found = {}
    for row in rows:
        name = row.get("heatmap_uri")
        if not name:
            continue
        fs, path = outputs.fs_and_path(outputs.join(results_dir, name))
        try:
            png = overlay_png(fs.cat_file(path), row.get("hot_box"), thumb_px)
        except (OSError, ValueError):
            continue
        found[row["uri"]] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return found
