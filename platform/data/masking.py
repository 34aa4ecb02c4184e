"""BEiT-style block masking of patch grids for the iBOT loss (DINOv2, arXiv 2304.07193).

Mirrors the official dinov2 ``MaskingGenerator`` and the masking part of its ``collate_data_and_cast``,
with two differences that make it exact and reproducible: the masked count is always exactly the
one asked for (the official generator may stop short), and all randomness comes from an explicit
``torch.Generator``, so masks are a pure function of the generator's seed (``MaskSampler``: of
the run's seed, the step and the rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dinoforge.data.stream import MASK_STREAM, sample_seed

MAX_TRIES = 10  # rectangle tries per placement round, as the official MaskingGenerator._mask


def _place_rectangle(
    mask: torch.Tensor, max_new: int, min_patches: int, log_aspect: float, generator: torch.Generator
) -> int:
    """One round of up to MAX_TRIES random rectangles; masks the first one that newly covers
    between 1 and ``max_new`` patches and returns how many it covered (0 if none did)."""
    height, width = mask.shape
    low = min(min_patches, max_new)
    for area_u, aspect_u, top_u, left_u in torch.rand(MAX_TRIES, 4, generator=generator, dtype=torch.float64).tolist():
        area = low + (max_new - low) * area_u
        aspect = math.exp(log_aspect * (2.0 * aspect_u - 1.0))  # log-uniform in [min_aspect, 1/min_aspect]
        h = round(math.sqrt(area * aspect))
        w = round(math.sqrt(area / aspect))
        # As the official code: the rectangle must be strictly smaller than the grid.
        if h < height and w < width:
            top = int(top_u * (height - h + 1))
            left = int(left_u * (width - w + 1))
            region = mask[top : top + h, left : left + w]
            new = h * w - int(region.sum())
            if 0 < new <= max_new:
                region.fill_(True)
                return new
    return 0


def block_mask(
    grid: tuple[int, int],
    num_masked: int,
    generator: torch.Generator,
    min_patches: int = 4,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """Bool (H, W) with exactly ``num_masked`` True, built from random rectangles.

    Each rectangle's area is uniform in [min_patches, remaining] (just ``remaining`` once fewer than
    ``min_patches`` are left), its aspect ratio log-uniform in [min_aspect, 1/min_aspect], and only
    newly covered patches count.  When a round of MAX_TRIES rectangles adds nothing, the rest are
    random unmasked patches, so the count is exact."""
    height, width = grid
    if height < 1 or width < 1:
        raise ValueError(f"grid must have positive sides, got {grid!r}")
    if not 0 <= num_masked <= height * width:
        raise ValueError(f"num_masked must be in [0, {height * width}] for grid {grid!r}, got {num_masked}")
    if min_patches < 1:
        raise ValueError(f"min_patches must be >= 1, got {min_patches}")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    mask = torch.zeros(height, width, dtype=torch.bool)
    log_aspect = -math.log(min_aspect)
    count = 0
    while count < num_masked:
        added = _place_rectangle(mask, num_masked - count, min_patches, log_aspect, generator)
        if added == 0:
            break
        count += added
    if count < num_masked:
        unmasked = (~mask).view(-1).nonzero().squeeze(1)
        pick = torch.randperm(unmasked.numel(), generator=generator)[: num_masked - count]
        mask.view(-1)[unmasked[pick]] = True
    return mask


def sample_masks(
    n_images: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """Bool (n_images, H*W) iBOT masks for a batch, as the official collate: int(n_images * p)
    images are masked, the i-th of them with a ratio uniform in [r_i, r_{i+1}], r = linspace(
    ratio_min, ratio_max, n_masked + 1) (so ratios spread over the range), and num_masked =
    int(H*W*ratio); the other images are unmasked; then the rows are shuffled."""
    ratio_min, ratio_max = ratio_min_max
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if not 0 <= mask_probability <= 1:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if not 0 <= ratio_min <= ratio_max <= 1:
        raise ValueError(f"ratio_min_max must satisfy 0 <= min <= max <= 1, got {ratio_min_max!r}")
    n_patches = grid[0] * grid[1]
    n_masked = int(n_images * mask_probability)
    bounds = torch.linspace(ratio_min, ratio_max, n_masked + 1, dtype=torch.float64).tolist()
    masks = torch.zeros(n_images, n_patches, dtype=torch.bool)
    for i, u in enumerate(torch.rand(n_masked, generator=generator, dtype=torch.float64).tolist()):
        ratio = bounds[i] + (bounds[i + 1] - bounds[i]) * u
        masks[i] = block_mask(grid, int(n_patches * ratio), generator).view(-1)
    return masks[torch.randperm(n_images, generator=generator)]


@dataclass(frozen=True)
class MaskSampler:
    """One rank's masks for each training step: ``sampler(step)`` is a pure function of (seed,
    step, rank), so a resumed run draws the same masks at the same step."""

    seed: int
    rank: int
    n_images: int
    grid: int  # patches per side
    mask_probability: float
    ratio_min_max: tuple[float, float]

    def __call__(self, step: int) -> torch.Tensor:
        seed = sample_seed(sample_seed(self.seed, step, MASK_STREAM), self.rank, MASK_STREAM)
        generator = torch.Generator().manual_seed(seed)
        return sample_masks(self.n_images, (self.grid, self.grid), generator, self.mask_probability, self.ratio_min_max)
