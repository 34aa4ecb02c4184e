import torch
import torch.nn.functional as F

from dinoforge.data import FashionMNIST
from dinoforge.eval.features import prepare_image
from dinoforge.eval.knn import knn_accuracy, knn_scores


def plain_knn_top1(train, train_labels, test, test_labels, k, temperature, num_classes):
    """Independent loop: one test sample at a time, sorted similarities, weighted votes."""
    correct = 0
    for x, y in zip(test, test_labels):
        sims = [(float(torch.dot(x, t)), int(label)) for t, label in zip(train, train_labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, label in sims[:k]:
            votes[label] += torch.exp(torch.tensor(sim / temperature)).item()
        correct += int(max(range(num_classes), key=lambda c: votes[c]) == int(y))
    return 100.0 * correct / len(test)


def test_knn_matches_plain_computation():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    feats = F.normalize(centers[labels] + 2.0 * torch.randn(300, 16, generator=g), dim=-1)
    train, test = feats[:240], feats[240:]
    result = knn_accuracy(train, labels[:240], test, labels[240:], k=20, temperature=0.07)
    assert abs(result["top1"] - plain_knn_top1(train, labels[:240], test, labels[240:], 20, 0.07, 4)) < 1e-9
    assert 40 < result["top1"] < 95 and result["top5"] == 100.0


def test_knn_scores_weights():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    scores = knn_scores(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), num_classes=2, k=2, temperature=0.5)
    expected = torch.tensor([[torch.exp(torch.tensor(2.0)), torch.exp(torch.tensor(1.2))]])
    torch.testing.assert_close(scores, expected)


def test_prepare_image_grayscale_resize_and_normalise():
    img = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    out = prepare_image(img, 28, 28, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert out.shape == (3, 28, 28) and torch.allclose(out, torch.full_like(out, 2.0))
    rgb = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    assert prepare_image(rgb, 32, 36, (0, 0, 0), (1, 1, 1)).shape == (3, 32, 32)


def test_raw_pixel_knn_reference_number():
    """ANCHORS.md: raw-pixel cosine 20-NN (T=0.07) on Fashion-MNIST test = 84.6% top-1."""
    train, test = FashionMNIST("/usr/share/datasets/fashion-mnist", "train"), FashionMNIST("/usr/share/datasets/fashion-mnist", "test")
    result = knn_accuracy(
        F.normalize(train.images.flatten(1).float(), dim=-1), train.labels,
        F.normalize(test.images.flatten(1).float(), dim=-1), test.labels, k=20, temperature=0.07,
    )
    assert abs(result["top1"] - 84.6) < 0.1, result
