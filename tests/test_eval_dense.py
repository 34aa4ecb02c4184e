"""Dense probes: synthetic scene invariants, metrics against plain numpy, probes that learn
from oracle feature maps and not from random ones, determinism, the end-to-end helper."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoforge.data.sources import FashionMNIST
from dinoforge.eval.dense import (
    bilinear_matrix, confusion_matrix, dense_eval, depth_metrics, depth_probe, make_scenes, scene_inputs,
    segmentation_metrics, segmentation_probe,
)
from dinoforge.eval.features import patch_features
from dinoforge.model import build_backbone

ROOT = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The probes here run many small steps; on the shared 2-core machine a second thread
    mostly waits for a busy core: this file measured ~50 s with 2 threads and 8 s with 1
    at a load average of ~4."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fashion():
    return FashionMNIST(ROOT, "train"), FashionMNIST(ROOT, "test")


@pytest.fixture(scope="module")
def scenes(fashion):
    """Probe data: training scenes from train-split items, test scenes from test-split items."""
    return make_scenes(120, seed=0, source=fashion[0]), make_scenes(40, seed=1, source=fashion[1])


def painted(source, items, size):
    """Independent painter from the item records (pasted in record order, silhouettes
    recomputed here): seg, depth, image (item pixels only), owner (record index of the
    visible item, -1 for background), how many silhouettes cover each pixel and the nearest
    covering depth."""
    rows = torch.arange(size, dtype=torch.float64).view(size, 1)
    depth = (1 / (1 / 10 + (1 / 5 - 1 / 10) * rows / (size - 1))).expand(size, size).clone()  # 10 m top, 5 m bottom
    seg, owner, covers = (torch.zeros(size, size, dtype=torch.int64) for _ in range(3))
    owner -= 1
    image = torch.zeros(size, size, dtype=torch.uint8)
    nearest = torch.full((size, size), float("inf"), dtype=torch.float64)
    for k, (index, top, left, side) in enumerate(items):
        resized = F.interpolate(source.images[index][None, None].float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0, 0].round()
        pixels = torch.zeros(size, size, dtype=torch.bool)
        pixels[top : top + side, left : left + side] = resized > 32
        item_depth = 1.5 * (3 * size // 4) / side  # 1.5 m for the largest side, inversely proportional
        seg[pixels], depth[pixels], owner[pixels] = 1 + int(source.labels[index]), item_depth, k
        image[top : top + side, left : left + side] = torch.where(pixels[top : top + side, left : left + side], resized.to(torch.uint8), image[top : top + side, left : left + side])
        covers += pixels
        nearest[pixels] = nearest[pixels].clamp(max=item_depth)
    return seg, depth, image, owner, covers, nearest


def test_scene_invariants(fashion):
    train, test = fashion
    size, data = 56, make_scenes(30, seed=5, source=train, max_objects=3)
    assert data.images.shape == (30, 1, size, size) and data.images.dtype == torch.uint8
    assert data.seg.dtype == torch.int64 and data.depth.dtype == torch.float32 and data.num_classes == 11
    overlapping = 0
    for scene in range(30):
        records = data.items[scene].tolist()
        items = [record for record in records if record[0] >= 0]
        assert 1 <= len(items) <= 3 and all(record == [-1] * 4 for record in records[len(items) :])
        assert all(14 <= side <= 42 and 0 <= top <= size - side and 0 <= left <= size - side for _, top, left, side in items)
        assert [side for *_, side in items] == sorted(side for *_, side in items)  # painted far (small) to near
        seg, depth, image, owner, covers, nearest = painted(train, items, size)
        got_seg, got_depth, got_image = data.seg[scene], data.depth[scene].double(), data.images[scene, 0]
        assert torch.equal(got_seg, seg) and torch.allclose(got_depth, depth, atol=1e-5)
        assert torch.equal(got_image[covers > 0], image[covers > 0])  # items keep their resized intensities
        assert torch.equal(got_seg == 0, covers == 0)  # background exactly where no silhouette
        assert torch.allclose(got_depth[covers > 0], nearest[covers > 0], atol=1e-5)  # the nearest item occludes
        for k, (_, _, _, side) in enumerate(items):  # one depth per item, inversely proportional to its side
            assert torch.allclose(got_depth[owner == k], torch.tensor(63.0 / side, dtype=torch.float64), atol=1e-5)
        assert int(got_image[covers == 0].max()) <= 28 and int(got_image[covers > 0].min()) > 32
        overlapping += int((covers > 1).any())
    assert overlapping >= 5  # occlusion does happen in these scenes
    again = make_scenes(30, seed=5, source=train, max_objects=3)
    assert all(torch.equal(a, b) for a, b in zip((data.images, data.seg, data.depth, data.items), (again.images, again.seg, again.depth, again.items)))
    assert not torch.equal(make_scenes(30, seed=6, source=train).images, data.images)
    from_test = make_scenes(30, seed=5, source=test)
    assert from_test.items[..., 0].max() < len(test.labels) and not torch.equal(from_test.images, data.images)


def numpy_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[list, float, float]:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel()):
        matrix[t, p] += 1
    ious = []
    for k in range(num_classes):
        tp, fp, fn = matrix[k, k], matrix[:, k].sum() - matrix[k, k], matrix[k, :].sum() - matrix[k, k]
        ious.append(None if tp + fp + fn == 0 else 100 * tp / (tp + fp + fn))
    present = [iou for iou in ious if iou is not None]
    return ious, sum(present) / len(present), 100 * np.trace(matrix) / matrix.sum()


def test_segmentation_metrics_match_numpy():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 8, 8), generator=g)
    pred = torch.where(torch.rand(3, 8, 8, generator=g) < 0.3, torch.randint(0, 5, (3, 8, 8), generator=g), target)
    pred[0, 0, 0] = 4  # class 4 only predicted, class 5 nowhere
    result = segmentation_metrics(confusion_matrix(pred, target, 6))
    ious, miou, acc = numpy_metrics(pred.numpy(), target.numpy(), 6)
    assert result["per_class_iou"][5] is None and result["per_class_iou"][4] == 0.0
    assert all(abs(a - b) < 0.006 for a, b in zip(result["per_class_iou"][:5], ious[:5]))
    assert abs(result["mIoU"] - miou) < 0.006 and abs(result["pixel_acc"] - acc) < 0.006
    # by hand: class 0 IoU 1/2, class 1 IoU 2/3, class 2 absent
    hand = segmentation_metrics(confusion_matrix(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 0], [1, 1]]), 3))
    assert hand == {"mIoU": 58.33, "pixel_acc": 75.0, "per_class_iou": [50.0, 66.67, None]}


def test_depth_metrics_by_hand():
    assert depth_metrics(torch.tensor([2.0, 4.0, 1.1]), torch.tensor([2.0, 2.0, 1.0])) == {
        "rmse": round(((0 + 4 + 0.01) / 3) ** 0.5, 4), "abs_rel": round((0 + 1 + 0.1) / 3, 4), "delta1": round(2 / 3, 4),
    }


def test_bilinear_matrix_matches_interpolate():
    x = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(1))
    resized = bilinear_matrix(7, 28) @ x @ bilinear_matrix(5, 20).T
    assert torch.allclose(resized, F.interpolate(x, size=(28, 20), mode="bilinear", align_corners=False), atol=1e-6)


def patch_pixels(labels: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, H/4, W/4, 16): the pixels of each 4x4 patch."""
    n, height, width = labels.shape
    return labels.view(n, height // 4, 4, width // 4, 4).permute(0, 1, 3, 2, 4).reshape(n, height // 4, width // 4, 16)


def oracle_seg_maps(seg: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each patch's class histogram (a soft one-hot of its pixels' classes) plus noise."""
    histogram = F.one_hot(patch_pixels(seg), 11).float().mean(dim=-2).permute(0, 3, 1, 2)
    return histogram + 0.2 * torch.randn(histogram.shape, generator=generator)


def oracle_depth_maps(depth: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One-hot of each patch's mean depth in 20 bins over 1-10 m, plus noise."""
    bins = ((patch_pixels(depth).mean(dim=-1) - 1) / 9 * 20).long().clamp(0, 19)
    onehot = F.one_hot(bins, 20).float().permute(0, 3, 1, 2)
    return onehot + 0.2 * torch.randn(onehot.shape, generator=generator)


PROBE = {"epochs": 10, "lr": 0.1, "batch_size": 8}


def test_segmentation_probe_learns_oracle_not_noise(scenes):
    train, test = scenes
    g = torch.Generator().manual_seed(0)
    oracle = segmentation_probe(oracle_seg_maps(train.seg, g), train.seg, oracle_seg_maps(test.seg, g), test.seg, 11, seed=0, **PROBE)
    noise = segmentation_probe(torch.randn(120, 11, 14, 14, generator=g), train.seg, torch.randn(40, 11, 14, 14, generator=g), test.seg, 11, seed=0, **PROBE)
    assert list(oracle)[0] == "protocol" and oracle["protocol"] == "seg" and len(oracle["per_class_iou"]) == 11
    assert oracle["mIoU"] > 80 and oracle["pixel_acc"] > 93, oracle
    assert noise["mIoU"] < 20, noise


def test_depth_probe_learns_oracle_not_noise(scenes):
    train, test = scenes
    g = torch.Generator().manual_seed(0)
    oracle = depth_probe(oracle_depth_maps(train.depth, g), train.depth, oracle_depth_maps(test.depth, g), test.depth, min_depth=1.0, max_depth=10.0, seed=0, **PROBE)
    noise = depth_probe(torch.randn(120, 20, 14, 14, generator=g), train.depth, torch.randn(40, 20, 14, 14, generator=g), test.depth, min_depth=1.0, max_depth=10.0, seed=0, **PROBE)
    assert list(oracle)[0] == "protocol" and oracle["protocol"] == "depth"
    mean_rmse = float((train.depth.double().mean() - test.depth.double()).square().mean().sqrt())
    assert abs(oracle["baseline_rmse"] - mean_rmse) < 1e-4
    assert oracle["rmse"] < 0.45 * mean_rmse and oracle["delta1"] > 0.8, oracle
    assert noise["rmse"] > 0.9 * mean_rmse and noise["rmse"] > 2 * oracle["rmse"], noise


def test_probes_are_deterministic(scenes):
    train, test = scenes
    g = torch.Generator().manual_seed(3)
    seg_maps, depth_maps = oracle_seg_maps(torch.cat([train.seg, test.seg]), g), oracle_depth_maps(torch.cat([train.depth, test.depth]), g)
    args = {"epochs": 1, "lr": 0.1, "batch_size": 8}
    seg = [segmentation_probe(seg_maps[:120], train.seg, seg_maps[120:], test.seg, 11, seed=seed, **args) for seed in (4, 4, 5)]
    depth = [depth_probe(depth_maps[:120], train.depth, depth_maps[120:], test.depth, min_depth=1.0, max_depth=10.0, seed=seed, **args) for seed in (4, 4, 5)]
    assert seg[0] == seg[1] and depth[0] == depth[1]
    assert seg[0] != seg[2] and depth[0] != depth[2]  # the seed shuffles the minibatches


def test_dense_eval_normalises_and_runs_both_probes(fashion, scenes):
    train = scenes[0]
    meta = {"mean": (0.3, 0.3, 0.3), "std": (0.4, 0.4, 0.4), "patch_size": 4}
    inputs = scene_inputs(train.images[:2], meta)
    expected = (train.images[:2].double() / 255 - 0.3) / 0.4
    assert inputs.shape == (2, 3, 56, 56) and all(torch.allclose(inputs[:, c].double(), expected[:, 0], atol=1e-6) for c in range(3))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = build_backbone("vit_pico", patch_size=4, img_size=28, layerscale_init=1.0).eval()
    small_train, small_test = make_scenes(24, seed=3, source=fashion[0]), make_scenes(8, seed=4, source=fashion[1])
    seg, depth = dense_eval(backbone, meta, small_train, small_test, epochs=1, lr=0.01, seed=0)
    maps = [patch_features(backbone, (s.images.float().div(255).repeat(1, 3, 1, 1) - 0.3) / 0.4) for s in (small_train, small_test)]
    assert maps[0].shape == (24, 64, 14, 14)
    assert seg == segmentation_probe(maps[0], small_train.seg, maps[1], small_test.seg, 11, epochs=1, lr=0.01, seed=0)
    assert depth == depth_probe(maps[0], small_train.depth, maps[1], small_test.depth, min_depth=1.0, max_depth=10.0, epochs=1, lr=0.01, seed=0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dense_eval(backbone, meta, make_scenes(2, size=30, seed=0, source=fashion[1]), small_test, epochs=1)
