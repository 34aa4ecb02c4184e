"""Dense linear probes on frozen patch tokens (paper §7.4): semantic segmentation ("lin.":
one linear layer on the last block's patch tokens, logits bilinearly upsampled to the
pixels, mIoU) and monocular depth ("lin. 1": one linear layer predicting 256 uniformly
spaced depth bins, the depth being the bin centres weighted by the softmax, RMSE).

We have no dense labelled data, so ``make_scenes`` composes it from Fashion-MNIST items:

* canvas ``size`` x ``size`` px, one channel. Background: a flat ground plane seen by a
  level pinhole camera, whose inverse depth is affine in the image row, here from 10 m at
  the top row to 5 m at the bottom row; its intensity is a vertical gradient plus smooth
  low-frequency noise plus pixel grain, always below ``SILHOUETTE_THRESHOLD``.
* 1 to ``max_objects`` items, each a random image of ``source`` resized (bilinear,
  antialiased) to a random integer side between size // 4 and 3 * size // 4 px and pasted
  fully inside the canvas at a random position. An item's depth is inversely proportional
  to its side (a perspective camera: smaller = farther), ``NEAR_DEPTH`` m for the largest
  side; sides span ~3x, so items lie at 1.5 to ~4.5 m, always in front of the ground.
* an item's pixels (its silhouette) are those where its resized image is above
  ``SILHOUETTE_THRESHOLD``; items are painted far to near, so nearer items occlude
  farther ones. Those pixels take the item's intensity, class 1 + its label and its depth;
  every other pixel is background: class 0 and the ground depth.

Everything is drawn from one local generator seeded with ``seed``. Training scenes should
use the train split of Fashion-MNIST and test scenes the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoforge.eval.features import normalise, patch_features

SILHOUETTE_THRESHOLD = 32  # uint8: a resized item pixel above this belongs to the item
NEAR_DEPTH = 1.5  # metres, the depth of an item with the largest side
GROUND_DEPTH = (10.0, 5.0)  # metres, ground depth at the top and bottom rows
DEPTH_RANGE = (1.0, 10.0)  # metres, spanned by the depth probe's bins; holds every scene depth
SILOG_LAMBDA = 0.85  # weight of the squared mean log error in the SILog loss, AdaBins' value


class ItemSource(Protocol):
    images: Tensor  # uint8 (N, h, w)
    labels: Tensor  # int64 (N,)


@dataclass(frozen=True)
class DenseSet:
    """Synthetic dense scenes. ``items`` (N, max_objects, 4) holds, per drawn item in painting
    order (far to near): source index, top, left, side; unused rows are -1."""

    images: Tensor  # uint8 (N, 1, H, W)
    seg: Tensor  # int64 (N, H, W): 0 background, 1 + item label
    depth: Tensor  # float32 (N, H, W), metres
    items: Tensor  # int64 (N, max_objects, 4)
    num_classes: int


def item_depth(side: int, size: int) -> float:
    """Depth in metres of an item pasted with ``side`` px on a ``size`` px canvas."""
    return NEAR_DEPTH * (3 * size // 4) / side


def ground_depth(size: int) -> Tensor:
    """(size,) ground-plane depth per image row, float64: inverse depth affine in the row."""
    far, near = GROUND_DEPTH
    rows = torch.arange(size, dtype=torch.float64) / (size - 1)
    return 1.0 / (1.0 / far + (1.0 / near - 1.0 / far) * rows)


def resize_item(image: Tensor, side: int) -> Tensor:
    """uint8 (h, w) -> uint8 (side, side), bilinear with antialiasing."""
    out = F.interpolate(image[None, None].float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].round().clamp(0, 255).to(torch.uint8)


def _background(n: int, size: int, generator: torch.Generator) -> Tensor:
    """uint8 (n, size, size) ground texture, at most 6 + 10 + 8 + 4 = 28 < SILHOUETTE_THRESHOLD
    so no background pixel passes for an item pixel."""
    rows = torch.linspace(0, 1, size).view(size, 1)
    smooth = F.interpolate(torch.rand(n, 1, 7, 7, generator=generator), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    grain = torch.rand(n, size, size, generator=generator)
    return (6 + 10 * rows + 8 * smooth + 4 * grain).round().to(torch.uint8)


def make_scenes(n: int, size: int = 56, *, seed: int, source: ItemSource, max_objects: int = 3) -> DenseSet:
    """``n`` synthetic scenes built from ``source``'s items as the module docstring says."""
    generator = torch.Generator().manual_seed(seed)
    images = _background(n, size, generator)
    seg = torch.zeros(n, size, size, dtype=torch.int64)
    depth = ground_depth(size).float().view(size, 1).expand(n, size, size).clone()
    items = torch.full((n, max_objects, 4), -1, dtype=torch.int64)
    counts = torch.randint(1, max_objects + 1, (n,), generator=generator).tolist()
    total = sum(counts)
    indices = torch.randint(0, len(source.labels), (total,), generator=generator).tolist()
    sides = torch.randint(size // 4, 3 * size // 4 + 1, (total,), generator=generator).tolist()
    fractions = torch.rand(total, 2, generator=generator).tolist()
    # numpy views of the tensors: per-item indexing through them cut make_scenes' time by more than half (measured)
    canvas, labels, depths, records = images.numpy(), seg.numpy(), depth.numpy(), items.numpy()
    first = 0
    for scene, count in enumerate(counts):
        drawn = sorted(range(first, first + count), key=lambda item: sides[item])  # far (small) first, ties in draw order
        for slot, item in enumerate(drawn):
            index, side = indices[item], sides[item]
            top, left = (int(fraction * (size - side + 1)) for fraction in fractions[item])
            patch = resize_item(source.images[index], side).numpy()
            mask = patch > SILHOUETTE_THRESHOLD
            window = (scene, slice(top, top + side), slice(left, left + side))
            canvas[window][mask] = patch[mask]
            labels[window][mask] = 1 + int(source.labels[index])
            depths[window][mask] = item_depth(side, size)
            records[scene, slot] = (index, top, left, side)
        first += count
    return DenseSet(images.unsqueeze(1), seg, depth, items, num_classes=2 + int(source.labels.max()))


def _standardised(train_maps: Tensor, test_maps: Tensor) -> tuple[Tensor, Tensor]:
    """(N, D, h, w) maps -> (N, h, w, D), standardised per channel with the training maps'
    statistics: a fixed affine map (like the BatchNorm in eval mode before DINOv2's linear
    heads), so the probe stays linear and one learning rate suits backbones whose features
    differ in scale. Channels last so the head is a plain Linear over D."""
    mean = train_maps.mean(dim=(0, 2, 3), keepdim=True)
    std = train_maps.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return tuple(((maps - mean) / std).permute(0, 2, 3, 1).contiguous() for maps in (train_maps, test_maps))


def bilinear_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) weights of 1-D linear resampling, taken from ``F.interpolate``
    (align_corners=False). Bilinear resizing is separable, so a map (..., h, w) resized
    to (H, W) is ``bilinear_matrix(h, H) @ map @ bilinear_matrix(w, W).T``: two matmuls,
    whose backward pass measured ~3x cheaper than ``F.interpolate``'s on this CPU."""
    return F.interpolate(torch.eye(n_in)[None], size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def _upsampler(maps: Tensor, size: tuple[int, int]) -> Callable[[Tensor], Tensor]:
    """Bilinear resizing of (..., h, w) from the (N, h, w, D) ``maps`` to ``size``."""
    rows, cols = bilinear_matrix(maps.shape[1], size[0]), bilinear_matrix(maps.shape[2], size[1]).T
    return lambda x: rows @ x @ cols


def _train_linear(maps: Tensor, targets: Tensor, out_features: int, loss_fn: Callable[[Tensor, Tensor], Tensor], *, epochs: int, lr: float, seed: int, batch_size: int) -> nn.Linear:
    """A Linear over D at every patch (a 1x1 convolution) from zero, Adam with a cosine
    learning-rate decay over minibatches of maps shuffled by a local generator."""
    head = nn.Linear(maps.shape[-1], out_features)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    steps = epochs * -(-len(maps) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(maps), generator=generator).split(batch_size):
            loss = loss_fn(head(maps[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


@torch.no_grad()
def _predict(head: nn.Linear, maps: Tensor, to_output: Callable[[Tensor], Tensor], batch_size: int) -> Tensor:
    """``to_output`` of the head's logits, batch by batch, concatenated."""
    return torch.cat([to_output(head(maps[start : start + batch_size])) for start in range(0, len(maps), batch_size)])


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """int64 (num_classes, num_classes) pixel counts, rows = ground truth, columns = prediction."""
    flat = target.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_metrics(confusion: Tensor) -> dict:
    """Per-class IoU = TP / (TP + FP + FN) from a confusion matrix accumulated over the whole
    test set; mIoU averages it over the classes present in the ground truth or the
    prediction (TP + FP + FN > 0), the others are ``None``. Percentages, 2 decimals."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    iou = tp / union.clamp_min(1)
    return {
        "mIoU": round(100 * iou[present].mean().item(), 2),
        "pixel_acc": round(100 * (tp.sum() / confusion.sum()).item(), 2),
        "per_class_iou": [round(100 * value, 2) if ok else None for value, ok in zip(iou.tolist(), present.tolist())],
    }


def segmentation_probe(train_maps: Tensor, train_seg: Tensor, test_maps: Tensor, test_seg: Tensor, num_classes: int, *, epochs: int = 10, lr: float = 3e-2, seed: int = 0, batch_size: int = 64) -> dict:
    """Linear segmentation on frozen feature maps (N, D, h, w) with pixel labels (N, H, W):
    per-patch logits bilinearly upsampled to the labels, pixel cross-entropy; mIoU and pixel
    accuracy on the test set (``segmentation_metrics``)."""
    train_maps, test_maps = _standardised(train_maps, test_maps)
    upsample = _upsampler(train_maps, tuple(train_seg.shape[-2:]))
    head = _train_linear(train_maps, train_seg, num_classes, lambda logits, seg: F.cross_entropy(upsample(logits.permute(0, 3, 1, 2)), seg), epochs=epochs, lr=lr, seed=seed, batch_size=batch_size)
    upsample = _upsampler(test_maps, tuple(test_seg.shape[-2:]))
    pred = _predict(head, test_maps, lambda logits: upsample(logits.permute(0, 3, 1, 2)).argmax(dim=1), batch_size)
    return {"protocol": "seg", **segmentation_metrics(confusion_matrix(pred, test_seg, num_classes))}


def silog_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Scale-invariant log loss (Eigen et al. 2014) with AdaBins' square root and lambda,
    without its x10 scale: sqrt(mean(g^2) - lambda * mean(g)^2), g = log pred - log target
    over all pixels of the batch."""
    g = pred.log() - target.log()
    return (g.square().mean() - SILOG_LAMBDA * g.mean().square()).clamp_min(1e-12).sqrt()


def depth_metrics(pred: Tensor, target: Tensor) -> dict:
    """RMSE (m), AbsRel = mean |pred - gt| / gt and delta1 = share of pixels with
    max(pred / gt, gt / pred) < 1.25, over all pixels; 4 decimals."""
    pred, target = pred.double(), target.double()
    return {
        "rmse": round((pred - target).square().mean().sqrt().item(), 4),
        "abs_rel": round(((pred - target).abs() / target).mean().item(), 4),
        "delta1": round((torch.maximum(pred / target, target / pred) < 1.25).double().mean().item(), 4),
    }


def bin_depth(logits: Tensor, centres: Tensor) -> Tensor:
    """(..., bins) logits -> (...) depth: the bin centres weighted by the softmax. Logits are
    floored 40 below their maximum first: that moves a depth by under bins * e^-40 * centre
    (~1e-14 m here) but keeps float32 out of the denormal range (below ~e^-87), where a
    training step measured ~15x slower on this CPU (1 s instead of 70 ms) once the probe
    grows confident."""
    return logits.clamp(min=logits.detach().amax(dim=-1, keepdim=True) - 40).softmax(dim=-1) @ centres


def depth_probe(train_maps: Tensor, train_depth: Tensor, test_maps: Tensor, test_depth: Tensor, *, bins: int = 256, min_depth: float, max_depth: float, epochs: int = 10, lr: float = 3e-2, seed: int = 0, batch_size: int = 64) -> dict:
    """Linear depth on frozen feature maps (N, D, h, w) with depth maps (N, H, W) in metres:
    ``bins`` logits per patch, depth = softmax-weighted centres of ``bins`` uniform bins over
    [min_depth, max_depth], bilinearly upsampled to the pixels (the same as upsampling the
    bin probabilities first: the weighted sum is linear), trained with ``silog_loss``.
    ``baseline_rmse``: predicting the mean training depth everywhere."""
    width = (max_depth - min_depth) / bins
    centres = min_depth + width * (torch.arange(bins, dtype=torch.float32) + 0.5)
    train_maps, test_maps = _standardised(train_maps, test_maps)
    upsample = _upsampler(train_maps, tuple(train_depth.shape[-2:]))
    head = _train_linear(train_maps, train_depth, bins, lambda logits, depth: silog_loss(upsample(bin_depth(logits, centres)), depth), epochs=epochs, lr=lr, seed=seed, batch_size=batch_size)
    upsample = _upsampler(test_maps, tuple(test_depth.shape[-2:]))
    pred = _predict(head, test_maps, lambda logits: upsample(bin_depth(logits, centres)), batch_size)
    baseline = (train_depth.double().mean() - test_depth.double()).square().mean().sqrt().item()
    return {"protocol": "depth", **depth_metrics(pred, test_depth), "baseline_rmse": round(baseline, 4)}


def scene_inputs(images: Tensor, meta: dict) -> Tensor:
    """uint8 scenes (N, 1 or 3, H, W) -> float (N, 3, H, W) normalised with ``meta``'s
    mean/std, grayscale repeated to 3 channels (no resizing: H and W are kept)."""
    x = images.float().div(255)
    return normalise(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, meta["mean"], meta["std"])


def dense_eval(backbone: nn.Module, meta: dict, train: DenseSet, test: DenseSet, *, epochs: int = 10, lr: float = 3e-2, seed: int = 0, feature_batch_size: int = 256) -> tuple[dict, dict]:
    """Both probes on ``backbone``'s frozen last-block patch tokens of the scenes at their own
    resolution (a multiple of ``meta["patch_size"]``): (segmentation result, depth result)."""
    if any(side % meta["patch_size"] for scenes in (train, test) for side in scenes.images.shape[-2:]):
        raise ValueError(f"scene size must be a multiple of the patch size {meta['patch_size']}")
    train_maps = patch_features(backbone, scene_inputs(train.images, meta), feature_batch_size)
    test_maps = patch_features(backbone, scene_inputs(test.images, meta), feature_batch_size)
    seg = segmentation_probe(train_maps, train.seg, test_maps, test.seg, max(train.num_classes, test.num_classes), epochs=epochs, lr=lr, seed=seed)
    depth = depth_probe(train_maps, train.depth, test_maps, test.depth, min_depth=DEPTH_RANGE[0], max_depth=DEPTH_RANGE[1], epochs=epochs, lr=lr, seed=seed)
    return seg, depth
