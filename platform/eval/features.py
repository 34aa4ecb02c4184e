"""Frozen-feature extraction shared by every protocol.

Images are prepared once (``labelled_images``) as the exported weights' metadata says
(resize, centre crop, normalise) and fed through the backbone in eval mode without
gradients, so features are deterministic for given weights and images.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoforge.config import DataConfig

log = logging.getLogger(__name__)


def prepare_image(image: Tensor, image_size: int, resize_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (C, H, W), C in {1, 3} -> normalised float (3, image_size, image_size): resize
    the shorter side to ``resize_size`` (bicubic, antialiased), centre crop, normalise.
    Grayscale is repeated to 3 channels."""
    x = image.float().div(255)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    height, width = x.shape[-2:]
    scale = resize_size / min(height, width)
    new_h, new_w = max(round(height * scale), image_size), max(round(width * scale), image_size)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    x = x[:, top : top + image_size, left : left + image_size]
    return normalise(x, mean, std)


def normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Float images in [0, 1], (..., 3, H, W) -> normalised with per-channel mean/std."""
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def labelled_images(meta: dict, spec: str, data: DataConfig, limit: int | None = None,
                    shard: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor]:
    """The labelled images among the first ``limit`` of ``spec``, prepared as ``meta`` says:
    (N, 3, S, S), (N,). ``shard`` = (rank, world size) keeps only that rank's contiguous share
    (``shard_range``) of those images. Unusable or unlabelled images are skipped and counted in
    the log."""
    from dinoforge.data import open_source
    from dinoforge.data.decode import BadImage
    from dinoforge.eval.knn import shard_range

    source = open_source(spec, data)
    first, stop = shard_range(len(source) if limit is None else min(limit, len(source)), *shard)
    count = stop - first
    images, labels, skipped = [], [], Counter()
    for start in range(first, stop, 256):
        indices = range(start, min(stop, start + 256))
        for index, result in zip(indices, source.get_many(indices)):
            if isinstance(result, BadImage):
                log.warning("evaluation data: skipped %s: %s (%s)", source.uri(index), result.reason, result.detail)
                skipped[result.reason] += 1
            elif result[1] < 0:
                skipped["unlabelled"] += 1
            else:
                images.append(prepare_image(result[0], meta["image_size"], meta["resize_size"], meta["mean"], meta["std"]))
                labels.append(result[1])
    if skipped:
        log.warning("evaluation data %s: used %d of %d images, skipped %s", spec, len(labels), count, dict(skipped))
    if not labels:
        raise ValueError(f"evaluation data {spec!r} has no usable labelled images")
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def batched(backbone: nn.Module, images: Tensor, fn: Callable[[nn.Module, Tensor], Tensor], batch_size: int = 256) -> Tensor:
    """``fn(backbone, batch)`` over ``images`` in batches, in eval mode, concatenated along
    dim 0 as float32. The backbone's train/eval mode is restored afterwards."""
    was_training = backbone.training
    backbone.eval()
    try:
        return torch.cat([fn(backbone, images[start : start + batch_size]).float() for start in range(0, len(images), batch_size)])
    finally:
        backbone.train(was_training)


def cls_features(backbone: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """L2-normalised CLS features (N, D) of the last block (after the final norm)."""
    return F.normalize(batched(backbone, images, lambda model, x: model(x), batch_size), dim=-1)


def linear_features(backbone: nn.Module, images: Tensor, n_last_blocks: int = 4, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """For the linear probe (official ``eval/linear.py``): the CLS tokens of the last
    ``n_last_blocks`` blocks, each after the final norm, (N, n_last_blocks, D) ordered from the
    earliest to the last block, and the average of the last block's patch tokens (N, D)."""
    def both(model: nn.Module, x: Tensor) -> Tensor:
        layers = model.get_intermediate_layers(x, n_last_blocks, return_class_token=True)
        cls = torch.stack([class_token for _, class_token in layers], dim=1)
        return torch.cat([cls, layers[-1][0].mean(dim=1, keepdim=True)], dim=1)

    out = batched(backbone, images, both, batch_size)
    return out[:, :-1], out[:, -1]


def patch_features(backbone: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """The last block's normed patch tokens as a feature map (N, D, H / p, W / p)."""
    return batched(backbone, images, lambda model, x: model.get_intermediate_layers(x, 1, reshape=True)[0], batch_size)
