"""Instance retrieval on frozen features (paper §7, revisited Oxford/Paris protocol of
Radenović et al. 2018), on a benchmark built from our own images.

Each query is an edited view of a source image; the database holds "easy" views (mild
edits) and "hard" views (strong edits) of every query's source, plus distractors made from
other images. As in the revisited protocol, *Medium* counts easy and hard views as
positives, *Hard* counts only hard views and removes the easy ones from the ranking (junk).

AP is the revisited protocol's ``compute_ap`` (revisitop ``python/evaluate.py``): with junk
removed from the ranking, the i-th positive (i = 0, 1, ...) found at 0-based rank r_i adds
the trapezoid between precision i / r_i (taken as 1 when r_i = 0) and (i + 1) / (r_i + 1),
of width 1 / n_positives on the recall axis.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch import Tensor, nn

from dinoforge.eval.features import cls_features, prepare_image

EDIT_KINDS = ("easy", "hard", "distractor")


@dataclass(frozen=True, eq=False)
class RetrievalSet:
    """Queries and database (uint8, source resolution), which database images are each
    query's easy / hard positives, and where every image came from (indices into the
    images given to :func:`build_retrieval_set`)."""

    queries: Tensor  # (Q, C, H, W) uint8
    database: Tensor  # (M, C, H, W) uint8
    easy: Tensor  # (Q, M) bool
    hard: Tensor  # (Q, M) bool
    query_sources: Tensor  # (Q,) int64
    database_sources: Tensor  # (M,) int64

    def describe(self) -> dict:
        return {
            "n_queries": len(self.queries),
            "n_database": len(self.database),
            "n_easy": int(self.easy.sum()),
            "n_hard": int(self.hard.sum()),
            "n_distractors": int((~(self.easy | self.hard).any(dim=0)).sum()),
            "image_shape": list(self.queries.shape[1:]),
        }


def _to_pil(image: Tensor) -> Image.Image:
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def _from_pil(image: Image.Image) -> Tensor:
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _crop(image: Image.Image, rng: np.random.Generator, width_fraction: float, height_fraction: float) -> Image.Image:
    """A randomly placed box of the given fraction of each side, resized back to full size."""
    width, height = image.size
    box_w, box_h = width * width_fraction, height * height_fraction
    left, top = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
    return image.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + box_w, top + box_h))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert(image.mode)


def _away_from_one(rng: np.random.Generator, low: float, high: float) -> float:
    """A factor in [low, high] or its reciprocal range, log-uniform (for strong changes)."""
    factor = math.exp(rng.uniform(math.log(low), math.log(high)))
    return factor if rng.random() < 0.5 else 1.0 / factor


def mild_edit(image: Tensor, rng: np.random.Generator) -> Tensor:
    """Crop/shift keeping >= 90% of each side, horizontal flip (p = 0.5), brightness and
    contrast x[0.9, 1.1], JPEG re-encoding at quality 75."""
    pil = _crop(_to_pil(image), rng, rng.uniform(0.9, 1.0), rng.uniform(0.9, 1.0))
    if rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pil = ImageEnhance.Brightness(pil).enhance(rng.uniform(0.9, 1.1))
    pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(0.9, 1.1))
    return _from_pil(_jpeg(pil, 75))


def _strong_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keeps 50-70% of the area (aspect ratio in [3/4, 4/3], so no side exceeds the image)."""
    area, aspect = rng.uniform(0.5, 0.7), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    return _crop(image, rng, math.sqrt(area * aspect), math.sqrt(area / aspect))


def _rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = rng.uniform(10.0, 25.0) * rng.choice([-1.0, 1.0])
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0 if image.mode == "L" else (0, 0, 0))


def _contrast_gamma(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Contrast x[1.5, 2] or /[1.5, 2], then gamma in [1.5, 2.5] or its reciprocal."""
    image = ImageEnhance.Contrast(image).enhance(_away_from_one(rng, 1.5, 2.0))
    gamma = _away_from_one(rng, 1.5, 2.5)
    array = 255.0 * (np.asarray(image, dtype=np.float64) / 255.0) ** gamma
    return Image.fromarray(np.rint(array).astype(np.uint8), mode=image.mode)


def _noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise, sigma 10-25 grey levels."""
    array = np.asarray(image, dtype=np.float64)
    array = array + rng.normal(0.0, rng.uniform(10.0, 25.0), array.shape)
    return Image.fromarray(np.rint(array.clip(0, 255)).astype(np.uint8), mode=image.mode)


STRONG_EDITS = (_strong_crop, _rotate, _contrast_gamma, _noise)


def strong_edit(image: Tensor, rng: np.random.Generator) -> Tensor:
    """2 to 4 of: crop keeping 50-70% of the area, rotation by 10-25 degrees, strong
    contrast + gamma change, Gaussian noise; applied in that order (geometry first)."""
    count = int(rng.integers(2, len(STRONG_EDITS) + 1))
    chosen = np.sort(rng.choice(len(STRONG_EDITS), size=count, replace=False))
    pil = _to_pil(image)
    for index in chosen:
        pil = STRONG_EDITS[index](pil, rng)
    return _from_pil(pil)


def build_retrieval_set(images: Tensor, n_queries: int, n_distractors: int, seed: int, n_easy: int = 3, n_hard: int = 3) -> RetrievalSet:
    """A retrieval benchmark from uint8 images (N, H, W) or (N, C, H, W), C in {1, 3}:
    ``n_queries`` distinct source images each give one query (a mild edit), ``n_easy``
    mild and ``n_hard`` strong edits in the database; ``n_distractors`` other images
    complete the database. Distractors get a mild edit too, so that edit artefacts (JPEG,
    resampling) do not tell positives from distractors. Deterministic given ``seed``; the
    database order is a seeded shuffle, so ranking ties do not favour positives."""
    if images.dim() == 3:
        images = images[:, None]
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, H, W) or (N, C, H, W) with C in {{1, 3}}, got {images.dtype} {tuple(images.shape)}")
    if n_queries < 1 or n_easy < 1 or n_hard < 1 or n_distractors < 0:
        raise ValueError("need n_queries, n_easy, n_hard >= 1 and n_distractors >= 0")
    if n_queries + n_distractors > len(images):
        raise ValueError(f"{n_queries} queries + {n_distractors} distractors need that many distinct images, got {len(images)}")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(images))[: n_queries + n_distractors]
    sources, distractors = chosen[:n_queries], chosen[n_queries:]
    queries = [mild_edit(images[s], rng) for s in sources]
    views, owner, kind, origin = [], [], [], []
    for query, source in enumerate(sources):
        for edit, name, count in ((mild_edit, "easy", n_easy), (strong_edit, "hard", n_hard)):
            views += [edit(images[source], rng) for _ in range(count)]
            owner += [query] * count
            kind += [EDIT_KINDS.index(name)] * count
            origin += [source] * count
    views += [mild_edit(images[d], rng) for d in distractors]
    owner += [-1] * len(distractors)
    kind += [EDIT_KINDS.index("distractor")] * len(distractors)
    origin += distractors.tolist()
    order = torch.from_numpy(rng.permutation(len(views)))
    owner_t, kind_t = torch.tensor(owner)[order], torch.tensor(kind)[order]
    is_own = owner_t[None, :] == torch.arange(n_queries)[:, None]
    return RetrievalSet(
        queries=torch.stack(queries),
        database=torch.stack(views)[order],
        easy=is_own & (kind_t == EDIT_KINDS.index("easy")),
        hard=is_own & (kind_t == EDIT_KINDS.index("hard")),
        query_sources=torch.from_numpy(sources.astype(np.int64)),
        database_sources=torch.tensor(origin, dtype=torch.int64)[order],
    )


def positive_ranks(similarity: Tensor, positives: Tensor, junk: Tensor | None = None) -> list[np.ndarray]:
    """Per query, the sorted 0-based ranks of its positives in the database ranked by
    decreasing similarity (ties: lower database index first) after junk is removed.
    ``similarity``: (Q, M); ``positives``, ``junk``: (Q, M) bool."""
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    is_positive = positives.gather(1, order)
    kept = ~junk.gather(1, order) if junk is not None else torch.ones_like(is_positive)
    # Rank among the kept images = number of kept images before it.
    rank = kept.long().cumsum(dim=1) - 1
    return [rank[q][is_positive[q] & kept[q]].numpy() for q in range(len(similarity))]


def average_precision(ranks: np.ndarray, n_positives: int) -> float:
    """Revisited-protocol AP (trapezoids on the PR curve) from the sorted 0-based ranks of
    the positives found, junk already removed; positives not ranked add nothing."""
    if n_positives < 1 or len(ranks) > n_positives:
        raise ValueError(f"need 1 <= len(ranks) <= n_positives, got {len(ranks)} ranks for {n_positives} positives")
    ranks = np.asarray(ranks, dtype=np.float64)
    found_before = np.arange(len(ranks), dtype=np.float64)
    precision_before = np.where(ranks == 0, 1.0, found_before / np.maximum(ranks, 1.0))
    precision_at = (found_before + 1.0) / (ranks + 1.0)
    return float(((precision_before + precision_at) / 2.0).sum() / n_positives)


def mean_average_precision(similarity: Tensor, positives: Tensor, junk: Tensor | None = None) -> float:
    """Mean over queries of :func:`average_precision` (in [0, 1]); every query needs a positive."""
    counts = positives.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("every query needs at least one positive")
    ranks = positive_ranks(similarity, positives, junk)
    return float(np.mean([average_precision(r, int(n)) for r, n in zip(ranks, counts)]))


def retrieval_protocol(query_features: Tensor, database_features: Tensor, rset: RetrievalSet) -> dict:
    """Cosine-similarity retrieval: mAP (Medium and Hard protocols) and Medium recall@1
    (the top-ranked image is a positive), in percent."""
    # float32, like the k-NN protocol. The LayerScale-1e-5 training init has CLS features
    # that differ by 1 - cos ~1e-10 (measured on Fashion-MNIST), below float32 resolution, so
    # it ranks near chance here; in float64 its tiny random-projection signal is resolvable
    # (measured mAP_medium 10.06 vs 0.38 in float32, 200 queries / 3,200 images).
    queries = F.normalize(query_features.float(), dim=-1)
    database = F.normalize(database_features.float(), dim=-1)
    similarity = queries @ database.T
    medium = rset.easy | rset.hard
    medium_ranks = positive_ranks(similarity, medium)
    return {
        "protocol": "retrieval",
        "mAP_medium": round(100.0 * mean_average_precision(similarity, medium), 2),
        "mAP_hard": round(100.0 * mean_average_precision(similarity, rset.hard, junk=rset.easy), 2),
        "recall@1_medium": round(100.0 * float(np.mean([r[0] == 0 for r in medium_ranks])), 2),
        "n_queries": len(rset.queries),
        "n_database": len(rset.database),
    }


def retrieval_eval(backbone: nn.Module, meta: dict, rset: RetrievalSet, batch_size: int = 256) -> dict:
    """:func:`retrieval_protocol` on the backbone's CLS features, images prepared as ``meta`` says."""
    def features(images: Tensor) -> Tensor:
        prepared = torch.stack([prepare_image(image, meta["image_size"], meta["resize_size"], meta["mean"], meta["std"]) for image in images])
        return cls_features(backbone, prepared, batch_size)

    return retrieval_protocol(features(rset.queries), features(rset.database), rset)
