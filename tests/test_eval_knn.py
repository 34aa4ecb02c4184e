"""The k-NN protocol (paper §7): every k from one neighbour search, equal to an independent
plain computation on real Fashion-MNIST features and to single-k runs, and sharded over real
torchrun processes (gloo) with the same result as one process on the whole training set."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoforge.config import DataConfig
from dinoforge.data.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from dinoforge.eval.features import cls_features, labelled_images
from dinoforge.eval.knn import knn_accuracy, knn_protocol, nearest_neighbours, shard_range
from dinoforge.model import build_backbone

KS = (10, 20, 100, 200)


def plain_knn(train, train_labels, test, test_labels, ks, temperature, num_classes):
    """Independent numpy/python reference: the full similarity matrix, a stable descending
    argsort per test sample, votes exp(s / T) added one neighbour at a time; top-n is a hit
    when the label got votes and is among the n best classes (equal votes: lower class first).
    Returns {k: (top1, top5, per-class top-1)}."""
    sims = np.asarray(test, dtype=np.float64) @ np.asarray(train, dtype=np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")
    out = {}
    for k in ks:
        top1 = top5 = 0
        correct, total = [0] * num_classes, [0] * num_classes
        for i, label in enumerate(test_labels.tolist()):
            votes = [0.0] * num_classes
            for j in order[i, :k]:
                votes[int(train_labels[j])] += float(np.exp(sims[i, j] / temperature))
            ranked = [c for c in sorted(range(num_classes), key=lambda c: (-votes[c], c)) if votes[c] > 0]
            top1 += ranked[0] == label
            top5 += label in ranked[:5]
            correct[label] += ranked[0] == label
            total[label] += 1
        n = len(test_labels)
        per_class = [100.0 * c / t if t else None for c, t in zip(correct, total)]
        out[k] = (100.0 * top1 / n, 100.0 * top5 / n, per_class)
    return out


@pytest.fixture(scope="module")
def fashion_features():
    """CLS features of the first 5000 train / 1000 test Fashion-MNIST images through a seeded
    random ViT-pico/7 with LayerScale 1 (the random baseline of the pipeline)."""
    meta = {"image_size": 28, "resize_size": 28, "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}
    train_images, train_labels = labelled_images(meta, "fashion-mnist:train", DataConfig(), 5000)
    test_images, test_labels = labelled_images(meta, "fashion-mnist:test", DataConfig(), 1000)
    torch.manual_seed(0)
    backbone = build_backbone("vit_pico", patch_size=7, img_size=28, layerscale_init=1.0)
    return cls_features(backbone, train_images), train_labels, cls_features(backbone, test_images), test_labels


def test_fashion_mnist_knn_equals_an_independent_plain_computation(fashion_features):
    """The acceptance line. In float64 (the same feature values, cast losslessly) every k's
    top-1/top-5 and the per-class top-1 equal the plain computation exactly."""
    train, train_labels, test, test_labels = fashion_features
    result = knn_protocol(train.double(), train_labels, test.double(), test_labels, ks=KS, temperature=0.07)
    expected = plain_knn(train.numpy(), train_labels.numpy(), test.numpy(), test_labels.numpy(), KS, 0.07, 10)
    assert result["n_train"] == 5000 and result["n_test"] == 1000 and result["num_classes"] == 10
    assert set(result["k"]) == {str(k) for k in KS}
    for k in KS:
        assert (result["k"][str(k)]["top1"], result["k"][str(k)]["top5"]) == expected[k][:2], k
    assert result["per_class_top1"] == {"20": expected[20][2]}
    assert 20 < result["k"]["20"]["top1"] < 90  # a random ViT: far above chance, far below trained
    json.dumps(result)


def test_fashion_mnist_knn_in_float32_stays_within_one_sample_per_thousand(fashion_features):
    """The default float32 path: a random ViT's features are nearly collinear (cosines within
    about 0.01 of each other), so float32 rounding can swap neighbours at the k-th place; the
    numbers stay within 0.2 points of the exact ones."""
    train, train_labels, test, test_labels = fashion_features
    result = knn_protocol(train, train_labels, test, test_labels, ks=KS)
    exact = knn_protocol(train.double(), train_labels, test.double(), test_labels, ks=KS)
    for k in KS:
        for metric in ("top1", "top5"):
            assert abs(result["k"][str(k)][metric] - exact["k"][str(k)][metric]) <= 0.2 + 1e-9, (k, metric)


def test_every_k_equals_a_separate_single_k_computation(fashion_features):
    train, train_labels, test, test_labels = (t.double() if t.is_floating_point() else t for t in fashion_features)
    result = knn_protocol(train, train_labels, test, test_labels, ks=KS)
    for k in KS:
        assert result["k"][str(k)] == knn_accuracy(train, train_labels, test, test_labels, k=k, temperature=0.07), k


def clusters(n_train=600, n_test=150, dim=32, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n_train + n_test,), generator=g)
    feats = F.normalize(centers[labels] + 1.5 * torch.randn(n_train + n_test, dim, generator=g), dim=-1)
    return feats[:n_train], labels[:n_train], feats[n_train:], labels[n_train:]


def test_multi_k_float32_chunking_and_reference_on_spread_features():
    """Well-separated float32 features (no near-ties): multi-k equals single-k and the plain
    computation, and the test-set chunk size does not change anything."""
    train, train_labels, test, test_labels = clusters()
    ks = (1, 5, 20, 50)
    result = knn_protocol(train, train_labels, test, test_labels, ks=ks)
    assert result == knn_protocol(train, train_labels, test, test_labels, ks=ks, chunk_size=7)
    expected = plain_knn(train.numpy(), train_labels.numpy(), test.numpy(), test_labels.numpy(), ks, 0.07, 7)
    for k in ks:
        assert result["k"][str(k)] == knn_accuracy(train, train_labels, test, test_labels, k=k)
        assert (result["k"][str(k)]["top1"], result["k"][str(k)]["top5"]) == expected[k][:2]
    assert list(result["per_class_top1"]) == ["20"]  # 20 when it is among the ks
    assert list(knn_protocol(train, train_labels, test, test_labels, ks=(5, 50))["per_class_top1"]) == ["5"]


def test_nearest_neighbours_and_edge_cases():
    train, train_labels, test, test_labels = clusters(n_train=50, n_test=9)
    sims, idx = nearest_neighbours(train, test, 5)
    full = test @ train.T
    assert sims.shape == idx.shape == (9, 5)
    torch.testing.assert_close(sims, full.gather(1, idx))
    assert torch.all(sims[:, :-1] >= sims[:, 1:])
    torch.testing.assert_close(sims[:, 0], full.max(1).values)
    # k above the training set size is clipped to it: every sample votes.
    result = knn_protocol(train, train_labels, test, test_labels, ks=(5, 500))
    assert result["k"]["500"] == knn_accuracy(train, train_labels, test, test_labels, k=50)
    # Fewer than 5 classes received votes: classes without votes never count as top-5 hits.
    one_hot = torch.eye(4)
    got = knn_protocol(one_hot[:2], torch.tensor([0, 1]), one_hot[2:], torch.tensor([2, 3]), ks=(1,), num_classes=4)
    assert got["k"]["1"] == {"top1": 0.0, "top5": 0.0}
    assert got["per_class_top1"]["1"] == [None, None, 0.0, 0.0]
    with pytest.raises(ValueError):
        knn_protocol(train, train_labels, test, test_labels, num_classes=3)


def test_shard_range_covers_contiguously_with_sizes_within_one():
    for n in (0, 1, 2, 7, 301, 1000):
        for world in (1, 2, 3, 8):
            ranges = [shard_range(n, rank, world) for rank in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [stop - start for start, stop in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 0
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


SHARDED = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    import torch.nn.functional as F
    from dinoforge.eval.knn import knn_protocol, nearest_neighbours, shard_range

    def data(n_train, n_test=97, dim=24, classes=6, seed=1):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, dim, generator=g)
        labels = torch.randint(0, classes, (n_train + n_test,), generator=g)
        feats = F.normalize(centers[labels] + 1.5 * torch.randn(n_train + n_test, dim, generator=g), dim=-1)
        return feats[:n_train], labels[:n_train], feats[n_train:], labels[n_train:]

    # k above a shard, several test chunks; a rank without any training sample, default chunks.
    CASES = {"301": (301, (1, 5, 20, 200), 40), "2": (2, (1, 2, 20), None)}

    def run(rank=0, world=1):
        out = {}
        for name, (n_train, ks, chunk) in CASES.items():
            train, train_labels, test, test_labels = data(n_train)
            start, stop = shard_range(n_train, rank, world)
            result = knn_protocol(train[start:stop], train_labels[start:stop], test, test_labels, ks=ks, chunk_size=chunk)
            sims, idx = nearest_neighbours(train[start:stop], test, min(ks[-1], n_train), chunk_size=chunk)
            out[name] = {"result": result, "sims": sims.tolist(), "indices": idx.tolist()}
        return out

    if __name__ == "__main__":
        dist.init_process_group("gloo")
        out = run(dist.get_rank(), dist.get_world_size())
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out)
        if dist.get_rank() == 0:
            with open(sys.argv[1], "w") as f:
                json.dump(gathered, f)
        dist.destroy_process_group()
''')


@pytest.mark.parametrize("nproc", [2, 3])
def test_sharded_over_torchrun_ranks_equals_one_process(tmp_path, nproc):
    script, output = tmp_path / "sharded_knn.py", tmp_path / "out.json"
    script.write_text(SHARDED)
    # --standalone: torchrun picks a free port itself, as in test_distributed.py.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(script), str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    namespace: dict = {"__name__": "sharded_knn"}
    exec(compile(SHARDED, "sharded_knn", "exec"), namespace)  # same data, one process, no process group
    single = namespace["run"]()
    per_rank = json.loads(output.read_text())
    assert len(per_rank) == nproc
    for got in per_rank:  # every rank returns the full result
        for name, expected in single.items():
            assert got[name]["result"] == expected["result"], name
            assert got[name]["indices"] == expected["indices"], name
            np.testing.assert_allclose(got[name]["sims"], expected["sims"], rtol=0, atol=1e-6)
    assert single["301"]["result"]["n_train"] == 301 and single["2"]["result"]["k"]["20"] == single["2"]["result"]["k"]["2"]
