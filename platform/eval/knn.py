"""Weighted k-NN classification on frozen features (paper §7, DINO §4 / official
``eval/knn.py``): cosine similarity to the training features, the k most similar vote for
their class with weight exp(similarity / T), T = 0.07.

``knn_protocol`` finds the neighbours once, for the largest k, and scores every k from that
one sorted list. Under ``torch.distributed`` each rank passes only its shard of the training
set (``shard_range``) and the same test set: each rank finds its local top-k, the candidates
are all-gathered and merged into the global top-k, so every rank gets the result of one
process on the concatenated training set (ties aside).

Top-n counts a test sample as correct when its class received votes and is among the n
highest-scoring classes, equal scores ordered by class index (a stable descending sort).
Classes without votes never count, so top-5 does not depend on how classes with no
neighbours would be ordered when fewer than 5 classes got votes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinoforge.eval.features import cls_features, labelled_images

if TYPE_CHECKING:
    from dinoforge.distributed import World
    from dinoforge.eval.suite import SuiteSettings

# Elements of one chunk's (test x train) similarity block: 2**26 float32 = 256 MiB.
SIMILARITY_BUDGET = 2**26
MAX_CHUNK = 4096


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous shard of ``n`` items over ``world`` ranks: the
    first ``n % world`` ranks get one item more, so sizes differ by at most 1."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError(f"shard_range: need n >= 0 and 0 <= rank < world, got n={n}, rank={rank}, world={world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _distributed(distributed: bool | None) -> bool:
    initialised = dist.is_available() and dist.is_initialized()
    if distributed and not initialised:
        raise RuntimeError("distributed k-NN asked for, but torch.distributed is not initialised")
    return initialised if distributed is None else distributed


def _all_gather(tensor: Tensor) -> list[Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def _shard_sizes(n_local: int, device: torch.device, distributed: bool) -> list[int]:
    if not distributed:
        return [n_local]
    return [int(size) for size in _all_gather(torch.tensor([n_local], device=device))]


def _chunk_size(chunk_size: int | None, largest_shard: int) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, min(MAX_CHUNK, SIMILARITY_BUDGET // max(1, largest_shard)))


@torch.no_grad()
def _neighbours(train_features: Tensor, train_labels: Tensor | None, test_features: Tensor, k: int,
                chunk_size: int | None, distributed: bool) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """The ``k`` most similar training samples of every test sample, most similar first:
    similarities (N_test, k) in float32 (float64 for float64 features), global training
    indices (N_test, k) and their labels (or None without ``train_labels``), and the total
    training set size. ``k`` is clipped to it."""
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got train {tuple(train_features.shape)}, "
                         f"test {tuple(test_features.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = test_features.device
    dtype = torch.promote_types(torch.promote_types(test_features.dtype, train_features.dtype), torch.float32)
    train = train_features.to(device=device, dtype=dtype)
    labels = None if train_labels is None else train_labels.to(device=device, dtype=torch.long)
    if labels is not None and labels.shape != (len(train),):
        raise ValueError(f"{len(train)} training features but labels of shape {tuple(labels.shape)}")
    sizes = _shard_sizes(len(train), device, distributed)
    rank = dist.get_rank() if distributed else 0
    offset, n_train = sum(sizes[:rank]), sum(sizes)
    if n_train == 0:
        raise ValueError("k-NN needs at least one training sample")
    k = min(k, n_train)
    local_k = min(k, len(train))
    chunk = _chunk_size(chunk_size, max(sizes))

    sims, indices, votes_for = [], [], []
    for start in range(0, len(test_features), chunk):
        test = test_features[start : start + chunk].to(dtype)
        # Local candidates, padded to k columns (similarity -inf, index -1) for the all-gather.
        top_sim = torch.full((len(test), k), -torch.inf, dtype=dtype, device=device)
        top_idx = torch.full((len(test), k), -1, dtype=torch.long, device=device)
        if local_k:
            top_sim[:, :local_k], top_idx[:, :local_k] = (test @ train.T).topk(local_k, dim=1)
        top_lab = torch.full_like(top_idx, -1) if labels is not None else None
        if labels is not None and local_k:
            top_lab[:, :local_k] = labels[top_idx[:, :local_k]]
        top_idx[:, :local_k] += offset
        if distributed:
            ints = torch.stack([top_idx, top_lab], dim=-1) if labels is not None else top_idx[..., None]
            all_sim = torch.cat(_all_gather(top_sim), dim=1)
            all_int = torch.cat(_all_gather(ints), dim=1)
            top_sim, pick = all_sim.topk(k, dim=1)
            picked = all_int.gather(1, pick[..., None].expand(-1, -1, all_int.shape[-1]))
            top_idx = picked[..., 0]
            top_lab = picked[..., 1] if labels is not None else None
        sims.append(top_sim)
        indices.append(top_idx)
        votes_for.append(top_lab)
    if not sims:  # no test samples
        empty = torch.empty(0, k, dtype=dtype, device=device)
        return empty, empty.long(), None if labels is None else empty.long(), n_train
    return torch.cat(sims), torch.cat(indices), None if labels is None else torch.cat(votes_for), n_train


def nearest_neighbours(train_features: Tensor, test_features: Tensor, k: int, chunk_size: int | None = None,
                       distributed: bool | None = None) -> tuple[Tensor, Tensor]:
    """Cosine similarities (N_test, k) and indices (N_test, k) of the ``k`` nearest training
    samples of every test sample, most similar first (features L2-normalised). Under
    ``torch.distributed`` (``distributed=None``: whenever it is initialised) each rank passes its
    shard of the training set and gets indices into the concatenation of all ranks' shards."""
    similarities, indices, _, _ = _neighbours(train_features, None, test_features, k, chunk_size, _distributed(distributed))
    return similarities, indices


def _hits(scores: Tensor, labels: Tensor, n: int) -> Tensor:
    """(N,) bool: the label received votes and is among the ``n`` highest scores, equal scores
    ordered by class index (as a stable descending sort would)."""
    own = scores.gather(1, labels[:, None])
    classes = torch.arange(scores.shape[1], device=scores.device)
    rank = (scores > own).sum(1) + ((scores == own) & (classes < labels[:, None])).sum(1)
    return (own[:, 0] > 0) & (rank < n)


def _votes(neighbour_labels: Tensor, weights: Tensor, num_classes: int) -> Tensor:
    votes = torch.zeros(len(neighbour_labels), num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, neighbour_labels, weights)


def _num_classes(train_labels: Tensor, test_labels: Tensor, num_classes: int | None, distributed: bool, device) -> int:
    if num_classes is not None:
        return num_classes
    largest = max(int(train_labels.max()) if len(train_labels) else -1, int(test_labels.max()) if len(test_labels) else -1)
    if distributed:
        largest_t = torch.tensor([largest], device=device)
        dist.all_reduce(largest_t, op=dist.ReduceOp.MAX)
        largest = int(largest_t)
    return largest + 1


def _check_labels(labels: Tensor, num_classes: int, what: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what} labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")


@torch.no_grad()
def knn_protocol(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 ks: tuple[int, ...] = (10, 20, 100, 200), temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int | None = None, distributed: bool | None = None) -> dict:
    """Weighted k-NN top-1/top-5 (percent) for every k in ``ks`` from one neighbour search with
    k = max(ks), chunked over the test set. Features are assumed L2-normalised; similarities
    and votes are computed in float32, or float64 for float64 features.

    Under ``torch.distributed`` (``distributed=None``: whenever it is initialised) each rank
    passes only its shard of the training features and labels (``shard_range``) and the full
    test set; every rank returns the full result. Returns ``{"protocol": "knn", "temperature",
    "num_classes", "n_train", "n_test", "k": {"10": {"top1", "top5"}, ...}, "per_class_top1":
    {"20": [top-1 of class 0, ...]}}`` (per class for k = 20, or the first k without 20; None
    for a class without test samples)."""
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    distributed = _distributed(distributed)
    device = test_features.device
    test_labels = test_labels.to(device=device, dtype=torch.long)
    if len(test_labels) != len(test_features):
        raise ValueError(f"{len(test_features)} test features but {len(test_labels)} labels")
    num_classes = _num_classes(train_labels, test_labels, num_classes, distributed, device)
    _check_labels(train_labels, num_classes, "training")
    _check_labels(test_labels, num_classes, "test")

    similarities, _, neighbour_labels, n_train = _neighbours(train_features, train_labels, test_features, max(ks),
                                                            chunk_size, distributed)
    weights = (similarities / temperature).exp()
    per_class_k = 20 if 20 in ks else ks[0]
    n_test = len(test_labels)
    result: dict = {"protocol": "knn", "temperature": temperature, "num_classes": num_classes,
                    "n_train": n_train, "n_test": n_test, "k": {}, "per_class_top1": {}}
    for k in ks:
        kk = min(k, n_train)
        scores = _votes(neighbour_labels[:, :kk], weights[:, :kk], num_classes)
        top1, top5 = _hits(scores, test_labels, 1), _hits(scores, test_labels, 5)
        result["k"][str(k)] = {"top1": 100.0 * int(top1.sum()) / max(n_test, 1),
                               "top5": 100.0 * int(top5.sum()) / max(n_test, 1)}
        if k == per_class_k:
            correct = torch.bincount(test_labels[top1], minlength=num_classes).tolist()
            total = torch.bincount(test_labels, minlength=num_classes).tolist()
            result["per_class_top1"][str(k)] = [100.0 * c / t if t else None for c, t in zip(correct, total)]
    return result


@torch.no_grad()
def knn_scores(train_features: Tensor, train_labels: Tensor, test_features: Tensor, num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """(N_test, num_classes) class scores of one process: sum over the k nearest training
    samples of exp(cos / T) for their class."""
    k = min(k, len(train_features))
    train_labels = train_labels.to(train_features.device)
    scores = []
    for start in range(0, len(test_features), chunk):
        similarity = test_features[start : start + chunk] @ train_features.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        scores.append(_votes(train_labels[top_idx], (top_sim / temperature).exp(), num_classes))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=train_features.device)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Top-1/top-5 (percent) of one k in one process (``knn_protocol`` does several k at once,
    and sharded training sets)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    test_labels = test_labels.to(scores.device)
    return {
        "top1": 100.0 * _hits(scores, test_labels, 1).sum().item() / len(test_labels),
        "top5": 100.0 * _hits(scores, test_labels, 5).sum().item() / len(test_labels),
    }


def knn_eval(
    backbone: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    k: int = 20,
    temperature: float = 0.07,
) -> dict:
    """k-NN top-1/top-5 of ``backbone``'s CLS features on prepared (images, labels) sets, in
    one process."""
    train_features, test_features = cls_features(backbone, train[0]), cls_features(backbone, test[0])
    result = knn_accuracy(train_features, train[1], test_features, test[1], k=k, temperature=temperature)
    sizes = {"n_train": len(train[1]), "n_test": len(test[1])}
    return {"protocol": "knn", "k": k, "temperature": temperature, **result, **sizes}


def knn_sharded(backbones: dict[str, nn.Module], meta: dict, settings: SuiteSettings, world: World) -> list[dict]:
    """``knn_protocol`` for each backbone with the training set sharded across the ranks of
    ``world``: each rank prepares and embeds only its share of the training images; every rank
    gets every result."""
    shard = (world.rank, world.world_size)
    train_x, train_y = labelled_images(meta, settings.train, settings.data, settings.train_limit, shard)
    test_x, test_y = labelled_images(meta, settings.test, settings.data, settings.test_limit)
    train_y, test_y = train_y.to(world.device), test_y.to(world.device)
    results = []
    for name, backbone in backbones.items():
        backbone.to(world.device)
        train_f = cls_features(backbone, train_x.to(world.device))
        test_f = cls_features(backbone, test_x.to(world.device))
        result = knn_protocol(train_f, train_y, test_f, test_y, ks=settings.ks, temperature=settings.temperature)
        results.append({**result, "init": name, "world_size": world.world_size})
    return results
