"""Where in the image: SPADE heatmaps (Cohen & Hoshen 2020) for the top-ranked images.

For an image and its K retrieved normal images (the image-level kNN's neighbours), the
backbone's feature maps at a few stages of the resized *whole* image (no centre crop)
are compared location by location: a location's score is its mean Euclidean distance to
the ``kappa`` nearest locations anywhere in the neighbours' maps of the same stage. The
stages' maps are upsampled to the resized image, averaged and Gaussian-smoothed, as
SPADE does. Memory is bounded by K feature maps, whatever the normal set's size: no
memory bank of every normal patch (the PatchCore / PaDiM failure on large sets).

The maps are computed at the resized size (``side`` on the long side) and kept that
small until every explained image of the run has one: the run's maximum is the scale
(recorded in summary.json), and each map is then upsampled to the image's size after
EXIF orientation and written as a 16-bit grayscale PNG (value = map / scale * 65535).

Only the N explained images and their neighbours pay: this stage runs the torch backbone
on them alone, outside the graph that embeds every image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import apache_beam as beam
import fsspec
import numpy as np
from PIL import Image
from scipy import ndimage

from dn2ops.embed.backbones import get_spec, load_backbone
from dn2ops.embed.images import ImageDecodeError, load_image
from dn2ops.index.knn import knn

if TYPE_CHECKING:
    from torch import nn

LOG = logging.getLogger("dn2")

HEATMAP_DIR = "heatmaps"
# EfficientNet-Lite stages (0-6) whose last block's output is compared: strides 8, 16, 16
# (40, 80 and 112 channels); with K = 4 neighbours and a 128-pixel long side, the best
# of those measured on both kinds of benchmarks/localisation.py (stride 4's stage 1 lost
# on Fashion-MNIST). A ResNet's layer1-3, SPADE's own.
LITE_STAGES = (2, 3, 4)
RESNET_LAYERS = ("layer1", "layer2", "layer3")
# The backbones' total stride: resized sides are multiples of it (PatchFeatures.resized).
STRIDE = 32
# A hottest region: the connected area around the maximum above this share of it.
HOT_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Explained:
    """One image's heatmap before the run's scale is known: ``scores`` (h, w) float32 at
    the resized size; ``size`` (width, height) after EXIF orientation; ``missing`` the
    neighbours that could not be read (skipped)."""

    uri: str
    scores: np.ndarray | None
    size: tuple[int, int] | None
    neighbors: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    error: str | None = None


def oriented_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image file after its EXIF orientation, from its header."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a mangled EXIF block: load_image ignores it too
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _stage_outputs(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the compared feature maps (first part of a
    composite: its parts see the same image)."""
    from dn2ops.embed.efficientnet_lite import Concatenated, EfficientNetLite

    if isinstance(model, Concatenated):
        model = model.parts[0]
    if isinstance(model, EfficientNetLite):
        blocks = list(model._blocks)
        ends = [b for i, b in enumerate(blocks) if i == len(blocks) - 1 or
                blocks[i + 1]._project_conv.out_channels != b._project_conv.out_channels]
        return [ends[s] for s in LITE_STAGES]
    return [getattr(model, name) for name in RESNET_LAYERS]


class PatchFeatures:
    """The backbone's feature maps at its compared stages, of whole images resized to
    ``side`` pixels on the long side. Loaded lazily (torch imported then)."""

    def __init__(self, backbone: str, weights: str | None = None, *, side: int = 128):
        self.backbone = backbone
        self.weights = weights
        self.side = side
        self._model = None

    def _load(self):
        spec = get_spec(self.backbone)
        # a composite's first part only: its parts see the same image, and are offline
        model = (load_backbone(spec.parts[0]) if spec.parts
                 else load_backbone(self.backbone, self.weights))
        self._outputs: list = []
        for module in _stage_outputs(model):
            module.register_forward_hook(lambda _m, _i, out: self._outputs.append(out))
        self._model = model
        self._normalize = spec.preprocessing.normalization()

    def resized(self, image: Image.Image) -> Image.Image:
        """``image`` with its long side at ``side``, each side a multiple of STRIDE.

        Multiples of the network's total stride: TensorFlow's SAME padding (the
        EfficientNet-Lites') pads a side by its parity, so images of other sizes would
        differ along their top and left edges for that reason alone (measured: the top
        row of every stage's map far hotter than the rest)."""
        w, h = image.size
        scale = self.side / max(w, h)
        size = tuple(max(STRIDE, STRIDE * round(v * scale / STRIDE)) for v in (w, h))
        return image.resize(size, Image.BILINEAR) if size != image.size else image

    def maps(self, image: Image.Image) -> list[np.ndarray]:
        """An RGB image -> one float32 array (h_s, w_s, c_s) a stage."""
        import torch

        if self._model is None:
            self._load()
        x = torch.from_numpy(np.asarray(self.resized(image)).transpose(2, 0, 1).copy())
        self._outputs.clear()
        with torch.inference_mode():
            self._model(self._normalize(x)[None])
        maps = [o[0].permute(1, 2, 0).contiguous().numpy() for o in self._outputs]
        self._outputs.clear()
        return maps


def location_scores(query: Sequence[np.ndarray], normals: Sequence[Sequence[np.ndarray]],
                    out_shape: tuple[int, int], *, kappa: int = 1, sigma: float = 4.0
                    ) -> np.ndarray:
    """SPADE's map (out_shape) float32: per stage, each query location's mean distance to
    its ``kappa`` nearest locations among all of the neighbours' maps of that stage;
    the stages upsampled to ``out_shape`` (h, w), averaged and Gaussian-smoothed
    (``sigma`` pixels). Higher = less like the normal images."""
    total = np.zeros(out_shape, np.float32)
    for s, q in enumerate(query):
        h, w, c = q.shape
        xb = np.concatenate([n[s].reshape(-1, c) for n in normals])
        D, _ = knn(q.reshape(-1, c), xb, min(kappa, len(xb)))
        stage = Image.fromarray(D.mean(axis=1).reshape(h, w).astype(np.float32), mode="F")
        total += np.asarray(stage.resize(out_shape[::-1], Image.BILINEAR), np.float32)
    return ndimage.gaussian_filter(total / len(query), sigma).astype(np.float32)


def hot_box(scores: np.ndarray, size: tuple[int, int]) -> list[int]:
    """The hottest region of ``scores`` (h, w): the connected area around its maximum
    above HOT_SHARE of it, as [x0, y0, x1, y1] in pixels of an image of ``size``
    (width, height), PIL's box convention (x1, y1 exclusive)."""
    h, w = scores.shape
    labels, _ = ndimage.label(scores >= HOT_SHARE * scores.max())
    peak = np.unravel_index(int(np.argmax(scores)), scores.shape)
    ys, xs = np.nonzero(labels == labels[peak])
    W, H = size
    return [int(np.floor(xs.min() * W / w)), int(np.floor(ys.min() * H / h)),
            int(np.ceil((xs.max() + 1) * W / w)), int(np.ceil((ys.max() + 1) * H / h))]


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def _read_image(uri: str, side: int) -> tuple[Image.Image, tuple[int, int]]:
    data = read_bytes(uri)
    return load_image(data, min_side=side), oriented_size(data)


def explain(uri: str, neighbors: Sequence[str], features: PatchFeatures, *,
            kappa: int = 1, sigma: float = 4.0) -> Explained:
    """The heatmap of ``uri`` against the normal images ``neighbors`` (their uris); a
    neighbour that cannot be read or decoded is skipped, logged and listed in
    ``missing``. No heatmap (``error``) when the image itself, or every neighbour,
    cannot be read."""
    try:
        image, size = _read_image(uri, features.side)
    except (OSError, ImageDecodeError) as e:
        return Explained(uri, None, None, tuple(neighbors), error=f"{type(e).__name__}: {e}")
    normal_maps, missing = [], []
    for n in neighbors:
        try:
            normal_maps.append(features.maps(_read_image(n, features.side)[0]))
        except Exception as e:  # noqa: BLE001 (any store's error: the others are used)
            LOG.warning("heatmap of %s: neighbour %s skipped: %s: %s", uri, n,
                        type(e).__name__, e)
            missing.append(n)
    if not normal_maps:
        return Explained(uri, None, size, tuple(neighbors), tuple(missing),
                         error="no neighbour could be read")
    resized = features.resized(image)
    scores = location_scores(features.maps(image), normal_maps, resized.size[::-1],
                             kappa=kappa, sigma=sigma)
    return Explained(uri, scores, size, tuple(neighbors), tuple(missing))


def heatmap_name(position: int, uri: str) -> str:
    """heatmaps/NNN-<stem>-<hash>.png: the explained image's position (1 = top), a
    readable stem of its uri and a digest of the whole uri (uris may share a stem)."""
    stem = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:40]
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    return f"{HEATMAP_DIR}/{position:03d}-{stem}-{digest}.png"


def png16(scores: np.ndarray, size: tuple[int, int], scale: float) -> bytes:
    """The 16-bit grayscale PNG of ``scores`` (h, w) upsampled to ``size`` (width,
    height): value = score / scale * 65535 (scale > 0: the run's maximum)."""
    full = Image.fromarray(scores.astype(np.float32), mode="F").resize(size, Image.BILINEAR)
    values = np.clip(np.asarray(full) / scale, 0.0, 1.0) * 65535.0
    buf = io.BytesIO()
    Image.fromarray(np.round(values).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


# --- the Beam stage: the top rows of a scoring stage -> their heatmaps ---------------


def explain_count(explain: int | None, top: int | None, flagged: int) -> int:
    """How many top-ranked images get a heatmap: ``explain`` when given (--explain N);
    else the --top images, at most 20 (20 without --top), or the flagged ones when more,
    at most 100."""
    if explain is not None:
        return explain
    return max(min(top or 20, 20), min(flagged, 100))


def choose(top: list, explain: int | None, top_n: int | None, decision: dict | None
           ) -> list[tuple[int, Any]]:
    """(position, candidate) of the explained ones among ``top`` (best first), under the
    partition's decision (how many are flagged; see explain_count)."""
    flagged = ((decision or {}).get("flags") or {}).get("flagged") or 0
    return list(enumerate(top[:explain_count(explain, top_n, flagged)], start=1))


def candidates(batch, n: int):
    """The ``n`` highest-scored rows of an anomaly batch: (score, uri, neighbour uris)."""
    scores = batch.column("score").to_numpy(zero_copy_only=False)
    uris, neighbors = batch.column("uri"), batch.column("neighbor_uris")
    for i in np.argsort(-scores, kind="stable")[:n]:
        yield float(scores[i]), uris[int(i)].as_py(), tuple(neighbors[int(i)].as_py())


class ExactNeighbours:
    """Rows with fewer than ``k`` neighbours (a --kmeans index keeps none; an index's k
    may be below the heatmaps' K): their K nearest normal images by one exact search over
    the index's flat shards, streamed a shard at a time, of the images' features
    recomputed with the torch backbone (for these few images only)."""

    def __init__(self, index_dir: str, weights: str | None, k: int):
        self.index_dir = index_dir
        self.weights = weights
        self.k = k

    def __call__(self, chosen: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """(position, (score, uri, neighbours)) -> the same, neighbours completed to k; a
        row whose image cannot be read keeps its own (explain then reports it)."""
        short = [i for i, (_, (_, _, n)) in enumerate(chosen) if len(n) < self.k]
        if not short:
            return chosen
        try:
            return self._complete(chosen, short)
        except Exception as e:  # noqa: BLE001 (heatmaps never fail the scoring run)
            LOG.warning("heatmaps: the neighbours of %d image(s) could not be completed "
                        "(%s: %s); they are compared with the neighbours they have",
                        len(short), type(e).__name__, e)
            return chosen

    def _complete(self, chosen: list[tuple[int, Any]], short: list[int]
                  ) -> list[tuple[int, Any]]:
        from dn2ops import transforms
        from dn2ops.index import LoadedIndex
        from dn2ops.index.knn import knn_sharded

        index = LoadedIndex(self.index_dir, stream_shards=True, device="cpu")
        found = {i: self._embed(index, chosen[i][1][1]) for i in short}
        found = {i: x for i, x in found.items() if x is not None}
        if not found:
            return chosen
        xq = transforms.apply(np.concatenate(list(found.values())),
                              index.manifest.get("feature_transform", "none"))
        _, ids = knn_sharded(xq, index.iter_shards(), min(self.k, len(index.uris)))
        out = list(chosen)
        for row, i in zip(ids, found, strict=True):
            position, (score, uri, _) = chosen[i]
            out[i] = position, (score, uri, tuple(index.uris[j] for j in row if j >= 0))
        return out

    def _embed(self, index, uri: str) -> np.ndarray | None:
        """The image's pooled feature (1, dim) as the index's backbone makes it."""
        import torch

        if getattr(self, "_model", None) is None:
            spec = get_spec(index.manifest["backbone"])
            self._model = load_backbone(spec.name, self.weights)
            self._prep = spec.preprocessing
        try:
            image = load_image(read_bytes(uri), min_side=self._prep.resize)
        except (OSError, ImageDecodeError):
            return None
        x = torch.from_numpy(self._prep.crop_image(image))[None]
        with torch.inference_mode():
            return self._model(self._prep.normalization()(x)).numpy()


class _Explain:
    """(position, (score, uri, neighbours)) -> (position, Explained): the per-image step,
    with the backbone loaded once per worker (lazily, on the first image)."""

    def __init__(self, features: PatchFeatures, settings):
        self.features = features
        self.settings = settings

    def __call__(self, item):
        position, (_, uri, neighbors) = item
        try:
            return position, explain(uri, neighbors[:self.settings["k"]], self.features,
                                     kappa=self.settings["kappa"],
                                     sigma=self.settings["sigma"])
        except Exception as e:  # noqa: BLE001 (a heatmap never fails the scoring run)
            LOG.warning("heatmap of %s failed: %s: %s", uri, type(e).__name__, e)
            return position, Explained(uri, None, None, tuple(neighbors),
                                       error=f"{type(e).__name__}: {e}")


def write_heatmap(item, staging: str, scale: float) -> dict[str, Any]:
    """Writes one image's PNG into ``staging``; returns its entry: uri, heatmap_uri and
    hot_box (None without a heatmap), missing neighbours, error."""
    from dn2ops.io import outputs

    position, e = item
    entry = {"uri": e.uri, "heatmap_uri": None, "hot_box": None, "missing": list(e.missing),
             "error": e.error}
    if e.scores is None:
        return entry
    name = heatmap_name(position, e.uri)
    fs, path = outputs.fs_and_path(outputs.join(staging, name))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, png16(e.scores, e.size, scale))
    return {**entry, "heatmap_uri": name, "hot_box": hot_box(e.scores, e.size)}


def explained_result(entries: list[dict[str, Any]], scale: float | None,
                     settings: dict[str, Any]) -> dict[str, Any]:
    """The stage's singleton: ``rows`` uri -> (heatmap_uri, hot_box) for the ranked table,
    ``summary`` for summary.json (scale, settings, missing neighbours, failures)."""
    rows = {e["uri"]: (e["heatmap_uri"], e["hot_box"]) for e in entries if e["heatmap_uri"]}
    return {"rows": rows, "summary": {
        "explained": len(rows), "asked": len(entries),
        "scale": scale if rows else None, **settings,
        "missing_neighbors": {e["uri"]: e["missing"] for e in entries if e["missing"]},
        "failed": {e["uri"]: e["error"] for e in entries if e["error"]}}}


class ExplainTop(beam.PTransform):
    """Anomaly batches (the scoring stage's, unranked) -> a singleton (explained_result):
    the heatmaps of the top-ranked images (explain_count of them; ties by uri, as the
    top CSV orders them), written as PNGs under ``staging/heatmaps/``.

    ``decision``: the partition's (a singleton: how many are flagged); ``k``: the
    neighbours compared; ``side``: the long side images are resized to; ``kappa``: the
    nearest locations averaged; ``sigma``: the smoothing, in resized pixels.
    """

    def __init__(self, staging: str, decision, *, index_dir: str, backbone: str,
                 weights: str | None = None, explain: int | None = None,
                 top: int | None = None, k: int = 4, side: int = 128, kappa: int = 1,
                 sigma: float = 4.0):
        super().__init__()
        self.staging = staging
        self.decision = decision
        self.explain, self.top = explain, top
        self.settings = {"k": k, "side": side, "kappa": kappa, "sigma": sigma,
                         "backbone": backbone.split("+")[0],
                         "stages": list(LITE_STAGES) if "efficientnet" in backbone
                         else list(RESNET_LAYERS)}
        self.neighbours = ExactNeighbours(index_dir, weights, k)
        self.step = _Explain(PatchFeatures(backbone, weights, side=side), self.settings)

    def expand(self, scored):
        cap = self.explain if self.explain is not None else 100
        chosen = (scored
                  | "Candidates" >> beam.FlatMap(candidates, cap)
                  | "Top" >> beam.combiners.Top.Of(cap, key=lambda t: (-t[0], t[1]),
                                                   reverse=True)
                  | "Choose" >> beam.FlatMap(choose, self.explain, self.top,
                                             decision=beam.pvalue.AsSingleton(self.decision))
                  | "Together" >> beam.combiners.ToList()
                  | "Neighbours" >> beam.FlatMap(self.neighbours))
        explained = (chosen | "Spread" >> beam.Reshuffle()
                     | "Heatmap" >> beam.Map(self.step))
        scale = (explained
                 | "Peak" >> beam.Map(lambda pe: 0.0 if pe[1].scores is None
                                      else float(pe[1].scores.max()))
                 | "Scale" >> beam.CombineGlobally(lambda xs: max(xs, default=0.0) or 1.0))
        entries = explained | "WritePNG" >> beam.Map(
            write_heatmap, self.staging, scale=beam.pvalue.AsSingleton(scale))
        return (entries
                | "Entries" >> beam.combiners.ToList()
                | "Result" >> beam.Map(explained_result, scale=beam.pvalue.AsSingleton(scale),
                                       settings=self.settings))
