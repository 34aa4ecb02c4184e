"""Weighted k-NN classification on frozen features (DINO §4 / official ``eval/knn.py``):
cosine similarity to the training features, the k most similar vote for their class with
weight exp(similarity / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """L2-normalised CLS features (N, D) of prepared images, in eval mode."""
    was_training = backbone.training
    backbone.eval()
    features = []
    for start in range(0, len(images), batch_size):
        features.append(F.normalize(backbone(images[start : start + batch_size]).float(), dim=-1))
    backbone.train(was_training)
    return torch.cat(features)


@torch.no_grad()
def knn_scores(train_features: Tensor, train_labels: Tensor, test_features: Tensor, num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """(N_test, num_classes) class scores: sum over the k nearest training samples of
    exp(cos / T) for their class."""
    k = min(k, len(train_features))
    scores = []
    for start in range(0, len(test_features), chunk):
        similarity = test_features[start : start + chunk] @ train_features.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(top_idx), num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    return {
        "top1": 100.0 * (top[:, 0] == test_labels).sum().item() / len(test_labels),
        "top5": 100.0 * (top == test_labels[:, None]).any(dim=1).sum().item() / len(test_labels),
    }
