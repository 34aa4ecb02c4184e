import json

import numpy as np
import pytest
import torch

from dinoforge.data.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
from dinoforge.eval.features import cls_features, prepare_image
from dinoforge.eval.retrieval import (
    RetrievalSet,
    average_precision,
    build_retrieval_set,
    mean_average_precision,
    retrieval_eval,
    retrieval_protocol,
)
from dinoforge.model import build_backbone


@pytest.fixture(scope="module")
def fashion_test_images() -> torch.Tensor:
    return FashionMNIST("/usr/share/datasets/fashion-mnist", "test").images


def plain_ap(similarity: list[float], positive: list[bool], junk: list[bool]) -> float:
    """Independent loop: walk the ranking, skip junk, add the trapezoid between the
    precision before and after each positive (precision before the first item = 1)."""
    ranking = sorted(range(len(similarity)), key=lambda i: (-similarity[i], i))
    seen, found, ap = 0, 0, 0.0
    for i in ranking:
        if junk[i]:
            continue
        if positive[i]:
            before = 1.0 if seen == 0 else found / seen
            found += 1
            ap += (before + found / (seen + 1)) / 2
        seen += 1
    return ap / sum(positive)


def test_average_precision_hand_computed():
    # Positives at 0-based ranks 0, 2, 5 of 3: (1 + 1)/2 + (1/2 + 2/3)/2 + (2/5 + 3/6)/2 = 61/30.
    assert average_precision(np.array([0, 2, 5]), 3) == pytest.approx(61 / 90)
    assert average_precision(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    # One of two positives never ranked, the other second: (0/1 + 1/2)/2 of recall width 1/2.
    assert average_precision(np.array([1]), 2) == pytest.approx(0.125)


def test_mean_average_precision_skips_junk():
    # Ranked by similarity: idx 1 (junk), 5 (pos), 3 (neg), 2 (junk), 4 (pos), 0 (neg); without
    # junk the positives sit at ranks 0 and 2: ((1 + 1)/2 + (1/2 + 2/3)/2) / 2 = 19/24.
    similarity = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.8]])
    positives = torch.tensor([[False, False, False, False, True, True]])
    junk = torch.tensor([[False, True, True, False, False, False]])
    assert mean_average_precision(similarity, positives, junk) == pytest.approx(19 / 24)
    # Counted as negatives instead, positives at ranks 1 and 4: ((0 + 1/2)/2 + (1/4 + 2/5)/2) / 2.
    assert mean_average_precision(similarity, positives) == pytest.approx((0.25 + 0.325) / 2)


def test_protocol_medium_and_hard_by_hand():
    # Database ranked easy, hard, negative, easy, hard (cosine to the query decreases with angle).
    angles = torch.deg2rad(torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]))
    database_features = torch.stack([angles.cos(), angles.sin()], dim=1)
    rset = RetrievalSet(
        queries=torch.zeros(1, 1, 4, 4, dtype=torch.uint8),
        database=torch.zeros(5, 1, 4, 4, dtype=torch.uint8),
        easy=torch.tensor([[True, False, False, True, False]]),
        hard=torch.tensor([[False, True, False, False, True]]),
        query_sources=torch.tensor([0]),
        database_sources=torch.tensor([0, 0, 1, 0, 0]),
    )
    result = retrieval_protocol(torch.tensor([[1.0, 0.0]]), database_features, rset)
    # Medium: ranks 0, 1, 3, 4 of 4 -> (1 + 1 + (2/3 + 3/4)/2 + (3/4 + 4/5)/2) / 4 = 209/240.
    # Hard: easy removed -> hard, negative, hard: ranks 0, 2 of 2 -> 19/24.
    assert result == {
        "protocol": "retrieval", "mAP_medium": round(100 * 209 / 240, 2), "mAP_hard": round(100 * 19 / 24, 2),
        "recall@1_medium": 100.0, "n_queries": 1, "n_database": 5,
    }
    assert list(result)[0] == "protocol" and json.loads(json.dumps(result)) == result


def test_mean_average_precision_matches_plain_loop():
    g = torch.Generator().manual_seed(0)
    # Coarse similarities so that ties occur and their order (lower index first) is checked.
    similarity = torch.randint(0, 20, (30, 60), generator=g).double()
    positives = torch.rand(30, 60, generator=g) < 0.1
    positives[:, 0] = True
    junk = (torch.rand(30, 60, generator=g) < 0.2) & ~positives
    expected = np.mean([plain_ap(s.tolist(), p.tolist(), j.tolist()) for s, p, j in zip(similarity, positives, junk)])
    assert mean_average_precision(similarity, positives, junk) == pytest.approx(expected, abs=1e-12)


def random_ranking_ap(n: int, size: int) -> float:
    """E[AP] for n positives placed at random among ``size``: the trapezoid averages the
    precision after each positive, E = (H_size + (n-1)/(size-1) (size - H_size)) / size,
    and the precision before it, E = n / size."""
    harmonic = sum(1 / k for k in range(1, size + 1))
    return ((harmonic + (n - 1) / (size - 1) * (size - harmonic)) / size + n / size) / 2


def test_random_ranking_gives_expected_ap():
    queries, size, n = 2000, 200, 5
    g = torch.Generator().manual_seed(0)
    positives = torch.zeros(queries, size, dtype=torch.bool)
    positives[:, :n] = True
    measured = mean_average_precision(torch.rand(queries, size, generator=g, dtype=torch.float64), positives)
    # Measured: per-query AP std 0.039, so the mean of 2000 has std 0.0009.
    assert measured == pytest.approx(random_ranking_ap(n, size), abs=0.003)


def test_build_is_deterministic_and_well_formed(fashion_test_images):
    images = fashion_test_images[:300]
    first, again, other = (build_retrieval_set(images, 12, 40, seed) for seed in (0, 0, 1))
    for name in ("queries", "database", "easy", "hard", "query_sources", "database_sources"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.database, other.database) and not torch.equal(first.query_sources, other.query_sources)
    assert first.describe() == {"n_queries": 12, "n_database": 12 * 6 + 40, "n_easy": 36, "n_hard": 36, "n_distractors": 40, "image_shape": [1, 28, 28]}
    assert first.queries.dtype == first.database.dtype == torch.uint8
    assert len(set(first.query_sources.tolist())) == 12
    positives = first.easy | first.hard
    assert not (first.easy & first.hard).any() and torch.equal(positives.sum(dim=0) <= 1, torch.ones(len(first.database), dtype=torch.bool))
    for q, source in enumerate(first.query_sources):
        assert (first.easy[q].sum(), first.hard[q].sum()) == (3, 3)
        assert (first.database_sources[positives[q]] == source).all()
    distractor_sources = set(first.database_sources[~positives.any(dim=0)].tolist())
    assert len(distractor_sources) == 40 and not distractor_sources & set(first.query_sources.tolist())


def test_easy_edits_closer_to_source_than_hard(fashion_test_images):
    rset = build_retrieval_set(fashion_test_images[:200], 20, 0, seed=3)
    source = fashion_test_images[rset.database_sources].float()
    distance = (rset.database[:, 0].float() - source).abs().mean(dim=(1, 2))
    easy, hard = distance[rset.easy.any(dim=0)].mean(), distance[rset.hard.any(dim=0)].mean()
    assert easy < 0.75 * hard, (easy, hard)


def test_rgb_images_keep_shape():
    images = torch.randint(0, 256, (10, 3, 16, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rset = build_retrieval_set(images, 2, 3, seed=0, n_easy=1, n_hard=2)
    assert rset.queries.shape == (2, 3, 16, 20) and rset.database.shape == (2 * 3 + 3, 3, 16, 20)
    with pytest.raises(ValueError):
        build_retrieval_set(images, 5, 6, seed=0)


def test_identity_features_are_perfect(fashion_test_images):
    rset = build_retrieval_set(fashion_test_images[:100], 10, 30, seed=0)
    one_hot = torch.eye(100)
    result = retrieval_protocol(one_hot[rset.query_sources], one_hot[rset.database_sources], rset)
    assert (result["mAP_medium"], result["mAP_hard"], result["recall@1_medium"]) == (100.0, 100.0, 100.0)


def test_raw_pixels_medium_above_hard(fashion_test_images):
    rset = build_retrieval_set(fashion_test_images, 40, 400, seed=0)
    result = retrieval_protocol(rset.queries.flatten(1).float(), rset.database.flatten(1).float(), rset)
    n_database = 40 * 6 + 400
    assert result["n_database"] == n_database
    # Easy views are near copies, hard ones far in pixel space; both beat a random ranking.
    assert result["mAP_medium"] > result["mAP_hard"] + 10, result
    assert result["mAP_hard"] > 2 * 100 * random_ranking_ap(3, n_database - 3), result


def test_retrieval_eval_uses_prepared_cls_features(fashion_test_images):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = build_backbone("vit_pico", patch_size=4, img_size=28, layerscale_init=1.0)
    meta = {"image_size": 28, "resize_size": 28, "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}
    rset = build_retrieval_set(fashion_test_images[:60], 5, 20, seed=0)
    prepare = lambda images: torch.stack([prepare_image(x, 28, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD) for x in images])
    expected = retrieval_protocol(cls_features(backbone, prepare(rset.queries)), cls_features(backbone, prepare(rset.database)), rset)
    result = retrieval_eval(backbone, meta, rset, batch_size=16)
    assert result == expected and result["n_database"] == 5 * 6 + 20
    assert all(type(result[key]) is float for key in ("mAP_medium", "mAP_hard", "recall@1_medium"))
