import pytest
import torch

from dinoforge.data.masking import block_mask, sample_masks


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def components(mask: torch.Tensor) -> int:
    """Number of 4-connected components of True cells."""
    height, width = mask.shape
    cells = {(i, j) for i in range(height) for j in range(width) if mask[i, j]}
    count = 0
    while cells:
        count += 1
        stack = [cells.pop()]
        while stack:
            i, j = stack.pop()
            for nb in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if nb in cells:
                    cells.remove(nb)
                    stack.append(nb)
    return count


@pytest.mark.parametrize("grid", [(16, 16), (8, 8), (14, 10), (3, 5)])
def test_block_mask_count_is_exact(grid):
    total = grid[0] * grid[1]
    for num in sorted({0, 1, 2, 3, 5, total // 10, total // 5, total // 2, total - 1, total}):
        for seed in range(5):
            mask = block_mask(grid, num, gen(seed))
            assert mask.shape == grid and mask.dtype == torch.bool
            assert int(mask.sum()) == num


def test_block_mask_tops_up_when_no_rectangle_fits():
    # On a 1-row grid no rectangle is strictly smaller than the grid, so every patch is a top-up.
    mask = block_mask((1, 7), 5, gen(0))
    assert int(mask.sum()) == 5
    assert block_mask((2, 2), 4, gen(0)).all()


def test_block_mask_is_blocky():
    # 20% of a 16x16 grid: rectangles give a handful of components, scattered patches dozens.
    num = int(256 * 0.2)
    block = [components(block_mask((16, 16), num, gen(seed))) for seed in range(20)]
    scattered = []
    for seed in range(20):
        mask = torch.zeros(256, dtype=torch.bool)
        mask[torch.randperm(256, generator=gen(1000 + seed))[:num]] = True
        scattered.append(components(mask.view(16, 16)))
    mean_block, mean_scattered = sum(block) / 20, sum(scattered) / 20
    assert mean_scattered > 25
    assert mean_block < 8
    assert mean_block < 0.25 * mean_scattered


def test_block_mask_min_patches_sets_rectangle_size():
    # min_patches == num_masked: the first rectangle usually covers all 12 patches in one block;
    # min_patches == 1: rectangle areas are uniform in [1, remaining], so masks are several blocks.
    def singles(min_patches: int) -> int:
        return sum(components(block_mask((16, 16), 12, gen(s), min_patches=min_patches)) == 1 for s in range(30))

    assert singles(12) >= 20
    assert singles(1) <= 10


def test_block_mask_determinism():
    a = block_mask((16, 16), 60, gen(3))
    assert torch.equal(a, block_mask((16, 16), 60, gen(3)))
    assert not torch.equal(a, block_mask((16, 16), 60, gen(4)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(grid=(4, 4), num_masked=17), "num_masked"),
        (dict(grid=(4, 4), num_masked=-1), "num_masked"),
        (dict(grid=(0, 4), num_masked=0), "grid"),
        (dict(grid=(4, 4), num_masked=3, min_aspect=0.0), "min_aspect"),
        (dict(grid=(4, 4), num_masked=3, min_patches=0), "min_patches"),
    ],
)
def test_block_mask_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        block_mask(generator=gen(0), **kwargs)


def test_sample_masks_counts_and_spread():
    n_images, grid, n_patches = 64, (16, 16), 256
    masks = sample_masks(n_images, grid, gen(0))
    assert masks.shape == (n_images, n_patches) and masks.dtype == torch.bool
    counts = masks.sum(1)
    masked = counts[counts > 0]
    n_masked = int(n_images * 0.5)
    assert masked.numel() == n_masked
    # One ratio per linspace bin: the k-th smallest count lies in bin k.
    bounds = torch.linspace(0.1, 0.5, n_masked + 1, dtype=torch.float64).tolist()
    for k, count in enumerate(sorted(masked.tolist())):
        assert int(n_patches * bounds[k]) <= count <= int(n_patches * bounds[k + 1])
    assert int(masked.min()) <= int(n_patches * bounds[1]) and int(masked.max()) >= int(n_patches * bounds[-2])


@pytest.mark.parametrize("n_images, p, expected", [(10, 0.3, 3), (7, 0.5, 3), (8, 1.0, 8), (8, 0.0, 0), (0, 0.5, 0)])
def test_sample_masks_number_of_masked_images(n_images, p, expected):
    masks = sample_masks(n_images, (8, 8), gen(1), mask_probability=p)
    assert masks.shape == (n_images, 64)
    assert int((masks.sum(1) > 0).sum()) == expected


def test_sample_masks_rows_are_shuffled_and_deterministic():
    masks = sample_masks(64, (16, 16), gen(5))
    masked_rows = (masks.sum(1) > 0).nonzero().squeeze(1).tolist()
    assert masked_rows != list(range(32))
    assert torch.equal(masks, sample_masks(64, (16, 16), gen(5)))
    assert not torch.equal(masks, sample_masks(64, (16, 16), gen(6)))


def test_sample_masks_custom_ratio_range():
    masks = sample_masks(20, (10, 10), gen(2), mask_probability=1.0, ratio_min_max=(0.3, 0.3))
    assert masks.sum(1).tolist() == [30] * 20


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_images=-1), "n_images"),
        (dict(n_images=4, mask_probability=1.5), "mask_probability"),
        (dict(n_images=4, ratio_min_max=(0.6, 0.5)), "ratio_min_max"),
    ],
)
def test_sample_masks_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_masks(grid=(4, 4), generator=gen(0), **kwargs)
