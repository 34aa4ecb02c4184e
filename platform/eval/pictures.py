"""Pictures of frozen features: the PCA of patch features (paper Fig. 1 / §7.5), a
foreground-separation benchmark built on it, k-NN neighbour grids and per-class accuracy bars.

Grids are composed pixel by pixel with numpy and written with PIL, so their layout is exact
(tests locate cells by arithmetic); the bar chart uses matplotlib's object API with the Agg
canvas, so no pyplot state or window is involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.filters import threshold_otsu
from torch import Tensor, nn

from dinoforge.eval.features import normalise, patch_features

GAP = 2  # white pixels between grid cells
BORDER = 2  # coloured frame around each neighbour-grid cell
CAPTION = 12  # height of the class-name strip under a neighbour-grid cell
WHITE = (255, 255, 255)
QUERY_COLOUR = (40, 90, 200)
MATCH_COLOUR = (0, 170, 0)
MISMATCH_COLOUR = (220, 0, 0)
NEUTRAL_COLOUR = (128, 128, 128)
BAR_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


# -- images -----------------------------------------------------------------------------
def to_rgb_float(image: Tensor) -> Tensor:
    """uint8 (C, H, W), C in {1, 3} -> float (3, H, W) in [0, 1]; grayscale repeated."""
    x = image.float().div(255)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def patch_multiple_size(height: int, width: int, size: int, patch_size: int) -> tuple[int, int]:
    """(H, W) with the shorter side scaled to ``size`` and both sides rounded to the nearest
    multiple of ``patch_size`` (at least one patch), keeping the aspect ratio."""
    scale = size / min(height, width)
    return tuple(max(patch_size, round(side * scale / patch_size) * patch_size) for side in (height, width))


def resize_for_patches(image: Tensor, size: int, patch_size: int) -> Tensor:
    """uint8 (C, H, W) -> float (3, H', W') in [0, 1], both sides multiples of the patch size
    (bicubic, antialiased, as ``features.prepare_image``), without cropping."""
    x = to_rgb_float(image)
    new_size = patch_multiple_size(*x.shape[-2:], size, patch_size)
    if new_size == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x[None], size=new_size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)


def to_uint8_hwc(x: Tensor) -> np.ndarray:
    """Float (3, H, W) in [0, 1] -> uint8 (H, W, 3)."""
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def upsample(patch_map: np.ndarray, factor: int) -> np.ndarray:
    """Nearest upsampling of an (h, w, ...) array by an integer factor."""
    return patch_map.repeat(factor, axis=0).repeat(factor, axis=1)


def compose_grid(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """uint8 (H, W, 3) cells laid out row by row on white, ``GAP`` pixels around every cell.
    Each row is as tall as its tallest cell; cells sit at the top left of their slot and
    column ``j`` starts at the same x in every row (as wide as the widest cell of column j)."""
    n_cols = max(len(row) for row in rows)
    col_widths = [max(row[j].shape[1] for row in rows if j < len(row)) for j in range(n_cols)]
    row_heights = [max(cell.shape[0] for cell in row) for row in rows]
    canvas = np.full((GAP + sum(h + GAP for h in row_heights), GAP + sum(w + GAP for w in col_widths), 3), 255, np.uint8)
    top = GAP
    for row, height in zip(rows, row_heights):
        left = GAP
        for cell, width in zip(row, col_widths):
            canvas[top : top + cell.shape[0], left : left + cell.shape[1]] = cell
            left += width + GAP
        top += height + GAP
    return canvas


def save_png(array: np.ndarray, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


# -- PCA ----------------------------------------------------------------------------------
def pca_scores(features: Tensor, k: int) -> Tensor:
    """(N, D) -> (N, k) scores on the first ``k`` principal components (exact SVD of the
    centred features, float64). Sign convention: each component is flipped so that its
    largest-magnitude score is positive. The scores depend only on the Gram matrix of the
    centred features, so the result is unchanged by any orthogonal change of the feature
    basis (e.g. flipping the sign of feature dimensions). Missing components (rank < k) are 0."""
    x = features.double() - features.double().mean(dim=0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    scores = u[:, :k] * s[:k]
    peak = scores.gather(0, scores.abs().argmax(dim=0, keepdim=True))
    scores = scores * torch.where(peak < 0, -1.0, 1.0)
    return F.pad(scores, (0, k - scores.shape[1])).float()


def minmax(x: Tensor, dim: int = 0) -> Tensor:
    """Scales ``x`` to [0, 1] along ``dim`` (constant slices map to 0)."""
    low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-12)


def border_mask(height: int, width: int) -> Tensor:
    """bool (height, width), True on the outermost ring of patches."""
    mask = torch.ones(height, width, dtype=torch.bool)
    mask[1:-1, 1:-1] = False
    return mask


@dataclass(frozen=True)
class PCAResult:
    """Per image: the resized input (float (3, H, W) in [0, 1]), the first component oriented
    so foreground is high, min-max scaled over all images (float (h, w) in [0, 1]), the
    patch-level foreground mask (bool (h, w)) and the foreground's RGB map (float (3, h, w),
    background black). ``threshold`` is the cut applied to ``first``."""

    inputs: list[Tensor]
    first: list[Tensor]
    masks: list[Tensor]
    rgb: list[Tensor]
    patch_size: int
    threshold: float

    def save(self, path: str | Path, zoom: int = 1) -> None:
        """PNG grid, one row per image: input | first-component heat map (viridis) |
        foreground-masked RGB, each ``zoom`` times the network input size."""
        colour_map = matplotlib.colormaps["viridis"]
        factor = self.patch_size * zoom
        rows = []
        for image, first, rgb in zip(self.inputs, self.first, self.rgb):
            heat = (colour_map(first.numpy())[..., :3] * 255).round().astype(np.uint8)
            rows.append([upsample(to_uint8_hwc(image), zoom), upsample(heat, factor), upsample(to_uint8_hwc(rgb), factor)])
        save_png(compose_grid(rows), path)


@torch.no_grad()
def pca_picture(backbone: nn.Module, images: Sequence[Tensor], meta: dict, *, size: int, threshold: float | None = None) -> PCAResult:
    """Paper Fig. 1 (§7.5): a PCA over the last block's patch features of all ``images``
    together; its first component, thresholded, splits foreground from background; a second
    PCA over the foreground patches only gives three components shown as RGB (each min-max
    scaled over all foreground patches, so colours are comparable across images).

    ``images``: uint8 (C, H, W); each is resized so its shorter side is about ``size`` and
    both sides are multiples of ``meta["patch_size"]``, then normalised with meta's mean/std.
    Orientation rule: the first component is negated if the image-border patches score above
    the mean on average, because the object is assumed not to fill the image border (true of
    the benchmark images and of Fashion-MNIST). ``threshold``: the cut on the min-max scaled
    first component in [0, 1]; None uses Otsu's threshold on it. Deterministic: no sampling."""
    patch_size = meta["patch_size"]
    inputs = [resize_for_patches(image, size, patch_size) for image in images]
    maps = [patch_features(backbone, normalise(x, meta["mean"], meta["std"])[None])[0] for x in inputs]
    shapes = [tuple(m.shape[-2:]) for m in maps]
    tokens = torch.cat([m.flatten(1).T for m in maps])
    first = pca_scores(tokens, 1)[:, 0]
    border = torch.cat([border_mask(*shape).flatten() for shape in shapes])
    first = minmax(-first if first[border].mean() > 0 else first)
    cut = float(threshold_otsu(first.numpy())) if threshold is None else threshold
    foreground = first > cut
    colours = torch.zeros(len(tokens), 3)
    if foreground.sum() > 1:
        colours[foreground] = minmax(pca_scores(tokens[foreground], 3))
    counts = [h * w for h, w in shapes]
    return PCAResult(
        inputs=inputs,
        first=[f.view(shape) for f, shape in zip(first.split(counts), shapes)],
        masks=[m.view(shape) for m, shape in zip(foreground.split(counts), shapes)],
        rgb=[c.T.reshape(3, *shape) for c, shape in zip(colours.split(counts), shapes)],
        patch_size=patch_size,
        threshold=cut,
    )


# -- foreground benchmark ----------------------------------------------------------------
def mask_iou(patch_mask: Tensor, pixel_mask: Tensor) -> float:
    """IoU of a patch-level mask (bool (h, w)), upsampled by nearest neighbour to the pixel
    mask's (H, W), with that reference mask. Two empty masks agree perfectly (1.0)."""
    upsampled = F.interpolate(patch_mask[None, None].float(), size=tuple(pixel_mask.shape), mode="nearest")[0, 0].bool()
    union = (upsampled | pixel_mask).sum().item()
    return 1.0 if union == 0 else (upsampled & pixel_mask).sum().item() / union


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def camera_mask(image: np.ndarray) -> np.ndarray:
    """The cameraman of ``skimage.data.camera()``: pixels darker than Otsu's threshold,
    opened twice (3x3 cross), the largest connected component, holes filled (coat, hair and
    hands; most of the thin tripod is lost to the opening)."""
    return ndimage.binary_fill_holes(largest_component(ndimage.binary_opening(image < threshold_otsu(image), iterations=2)))


def benchmark_images() -> dict[str, tuple[Tensor, Tensor]]:
    """Bundled scikit-image pictures (files inside the wheel, no download) with reference
    foreground masks made by the documented rules above: name -> (uint8 (1, H, W), bool (H, W))."""
    camera = skimage.data.camera()
    horse = ~skimage.data.horse()  # the silhouette: skimage marks the white background True
    pairs = {
        "camera": (camera, camera_mask(camera)),
        "horse": ((~horse).astype(np.uint8) * 255, horse),
    }
    return {name: (torch.from_numpy(image)[None], torch.from_numpy(mask)) for name, (image, mask) in pairs.items()}


def foreground_benchmark(backbone: nn.Module, meta: dict, patches: int = 28) -> dict:
    """Foreground separation by ``pca_picture`` (Otsu cut, one PCA per image) on
    ``benchmark_images``: IoU of each patch mask with the reference mask, the shorter side
    ``patches`` patches long. 28 patches: with the Fashion-MNIST checkpoint (patch 4,
    112 px) the IoU was highest of 56/84/112 px and within 0.03 of the best patch-level masks.
    Both pictures are separable by intensity alone: that checkpoint's random init scored the
    same (mean IoU 0.87 for both), so this checks the picture works, not what training adds."""
    size = patches * meta["patch_size"]
    scores = {
        name: round(mask_iou(pca_picture(backbone, [image], meta, size=size).masks[0], mask), 4)
        for name, (image, mask) in benchmark_images().items()
    }
    return {"protocol": "pca", "size": size, "images": scores, "mean_iou": round(sum(scores.values()) / len(scores), 4)}


# -- k-NN neighbours and per-class accuracy ----------------------------------------------
def framed(image: Tensor, colour: tuple[int, int, int], zoom: int, caption: str | None) -> np.ndarray:
    """uint8 (C, H, W) -> uint8 cell: the image ``zoom`` times larger inside a ``BORDER``-px
    frame of ``colour``, with a ``CAPTION``-px white strip holding ``caption`` below it."""
    pixels = upsample(to_uint8_hwc(to_rgb_float(image)), zoom)
    cell = np.empty((pixels.shape[0] + 2 * BORDER, pixels.shape[1] + 2 * BORDER, 3), np.uint8)
    cell[...] = colour
    cell[BORDER:-BORDER, BORDER:-BORDER] = pixels
    if caption is None:
        return cell
    strip = Image.new("RGB", (cell.shape[1], CAPTION), WHITE)
    ImageDraw.Draw(strip).text((1, 0), caption, fill=(0, 0, 0))
    return np.concatenate([cell, np.asarray(strip)])


def neighbour_grid(
    query_images: Sequence[Tensor],
    database_images: Sequence[Tensor],
    neighbour_indices: Tensor,
    path: str | Path,
    *,
    labels: tuple[Sequence[int], Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
    zoom: int = 1,
) -> None:
    """PNG grid, one row per query: the query (blue frame) then its nearest database images
    in the order of ``neighbour_indices`` (Q, k). With ``labels`` = (query labels, database
    labels) neighbours are framed green when their label matches the query's, red otherwise
    (grey without labels); ``class_names`` (needs ``labels``) captions every cell."""
    if class_names is not None and labels is None:
        raise ValueError("class_names needs labels to caption the cells")

    def caption(label: int | None) -> str | None:
        return None if class_names is None else class_names[int(label)]

    rows = []
    for q, indices in enumerate(neighbour_indices.tolist()):
        query_label = None if labels is None else int(labels[0][q])
        row = [framed(query_images[q], QUERY_COLOUR, zoom, caption(query_label))]
        for index in indices:
            label = None if labels is None else int(labels[1][index])
            colour = NEUTRAL_COLOUR if labels is None else MATCH_COLOUR if label == query_label else MISMATCH_COLOUR
            row.append(framed(database_images[index], colour, zoom, caption(label)))
        rows.append(row)
    save_png(compose_grid(rows), path)


def per_class_plot(per_class: dict[str, Sequence[float]], class_names: Sequence[str], path: str | Path, title: str) -> None:
    """Grouped bar chart PNG (1000 x 400 px): for every class one bar per series (e.g.
    trained vs random init), accuracies given in % (0-100), each bar labelled with its value."""
    for name, values in per_class.items():
        if len(values) != len(class_names) or not all(0 <= v <= 100 for v in values):
            raise ValueError(f"series {name!r}: expected {len(class_names)} accuracies in % (0-100), got {list(values)}")
    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # attaches an Agg canvas to this figure only: no pyplot, no window
    axes = figure.add_subplot()
    width = 0.8 / len(per_class)
    positions = np.arange(len(class_names))
    for s, (name, values) in enumerate(per_class.items()):
        offset = (s - (len(per_class) - 1) / 2) * width
        bars = axes.bar(positions + offset, values, width, label=name, color=BAR_COLOURS[s % len(BAR_COLOURS)])
        axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks(positions, class_names, rotation=30, ha="right")
    axes.set_ylim(0, 105)  # headroom for the value labels of 100% bars
    axes.set_ylabel("accuracy (%)")
    figure.suptitle(title)
    figure.legend(loc="outside right upper")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
