"""Clustering for curation: faiss k-means, hierarchical k-means with resampling and balanced
top-down sampling (Vo et al. 2024, "Automatic Data Curation for Self-Supervised Learning: A
Clustering-Based Approach", arXiv 2405.15613, §4 and Algorithm 1).

Plain k-means puts more centroids where the data is dense, so sampling evenly from its clusters
still favours dominant concepts (Vo et al. §4). Their remedy, implemented here: cluster the
centroids of each level again (hierarchy), and at each level re-run k-means on the r points
closest to each centroid ("resampling"), which moves the centroids towards a uniform cover of
the data support. Sampling then splits the budget evenly across clusters from the top level down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np


@dataclass(frozen=True)
class KMeansResult:
    """centroids (k, D) float32; assignments (N,) int64 nearest centroid of each point; distances
    (N,) float32 squared L2 distance to it (inner product instead when clustering was spherical)."""

    centroids: np.ndarray
    assignments: np.ndarray
    distances: np.ndarray


@dataclass(frozen=True)
class Level:
    """One level of the tree. Its items are the data points (first level) or the previous
    level's centroids; ``parents[i]`` is item i's cluster here and ``distances[i]`` its squared
    L2 distance to that cluster's centroid ``centroids[parents[i]]``."""

    centroids: np.ndarray
    parents: np.ndarray
    distances: np.ndarray


@dataclass(frozen=True)
class Hierarchy:
    """Bottom-up levels: ``levels[0]`` clusters the data points, ``levels[i]`` the centroids of
    ``levels[i - 1]``; the last level holds the top clusters."""

    levels: tuple[Level, ...]

    @property
    def num_points(self) -> int:
        return len(self.levels[0].parents)

    def point_clusters(self) -> np.ndarray:
        """(N, L) int64: column i is every data point's cluster at ``levels[i]``."""
        out = np.empty((self.num_points, len(self.levels)), dtype=np.int64)
        out[:, 0] = self.levels[0].parents
        for i in range(1, len(self.levels)):
            out[:, i] = self.levels[i].parents[out[:, i - 1]]
        return out

    def cluster_sizes(self) -> list[np.ndarray]:
        """Per level, the number of data points under each of its clusters (int64)."""
        sizes = [np.bincount(self.levels[0].parents, minlength=len(self.levels[0].centroids))]
        for level in self.levels[1:]:
            summed = np.bincount(level.parents, weights=sizes[-1], minlength=len(level.centroids))
            sizes.append(np.rint(summed).astype(np.int64))
        return sizes


def _use_gpu(gpu: bool | None) -> bool:
    available = faiss.get_num_gpus() > 0
    if gpu and not available:
        raise RuntimeError("gpu=True but faiss sees no GPU (faiss-cpu, or no device)")
    return available if gpu is None else bool(gpu)


def _as_float32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected a non-empty (N, D) array, got shape {x.shape}")
    return x


def assign(x: np.ndarray, centroids: np.ndarray, *, spherical: bool = False, gpu: bool | None = None) -> KMeansResult:
    """Nearest centroid of every row of ``x`` by exact faiss search (max inner product when spherical)."""
    x, centroids = _as_float32(x), _as_float32(centroids)
    index = faiss.IndexFlatIP(x.shape[1]) if spherical else faiss.IndexFlatL2(x.shape[1])
    if _use_gpu(gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    distances, nearest = index.search(x, 1)
    return KMeansResult(centroids, nearest[:, 0].astype(np.int64), distances[:, 0])


def kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, spherical: bool = False,
           gpu: bool | None = None) -> KMeansResult:
    """faiss k-means (k-means++ seeding, as Vo et al.'s code) of float32 (N, D) rows into k clusters,
    then every point's nearest centroid. faiss trains on at most 256 * k points sampled with
    ``seed`` (its max_points_per_centroid), which keeps large N tractable; the assignment covers all N.
    On CPU the result depends only on ``seed``: faiss sums each centroid in one thread in point order,
    and we measured bitwise-equal results with 1 and 2 OpenMP threads (GPU runs not checked)."""
    x = _as_float32(x)
    if not 1 <= k <= len(x):
        raise ValueError(f"need 1 <= k <= N, got k={k}, N={len(x)}")
    if not 0 <= seed < 2**31:
        raise ValueError("faiss seeds are 32-bit signed ints")
    use_gpu = _use_gpu(gpu)
    # ClusteringInitMethod is in faiss since Dec 2025 (PR 4740). min_points_per_centroid=1: upper
    # levels and resampling cluster a few points per centroid by design (Vo et al. use r of about
    # half the mean cluster size), so faiss's "provide at least 39 * k points" warning would fire.
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical, gpu=use_gpu,
                      init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS, min_points_per_centroid=1)
    km.train(x)
    return assign(x, km.centroids, spherical=spherical, gpu=use_gpu)


def _rank_in_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values in a sorted array."""
    positions = np.arange(len(sorted_groups))
    starts = np.ones(len(sorted_groups), dtype=bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    return positions - np.maximum.accumulate(np.where(starts, positions, 0))


def _closest_per_cluster(assignments: np.ndarray, distances: np.ndarray, r: int) -> np.ndarray:
    """Sorted indices of the (at most) r items of each cluster closest to its centroid."""
    order = np.lexsort((distances, assignments))
    return np.sort(order[_rank_in_groups(assignments[order]) < r])


def _sub_seed(seed: int, level: int, step: int) -> int:
    """A distinct faiss seed per (level, resampling step), all fixed by ``seed``."""
    return int(np.random.SeedSequence([seed, level, step]).generate_state(1)[0] % 2**31)


def _cluster_level(items: np.ndarray, k: int, steps: int, r: int, niter: int, seed: int, level: int,
                   gpu: bool | None) -> Level:
    """k-means of one level, then ``steps`` resampling steps (Vo et al. Algorithm 1): k-means on the
    union of the r items closest to each centroid, then reassign all items to the new centroids."""
    result = kmeans(items, k, niter=niter, seed=_sub_seed(seed, level, 0), gpu=gpu)
    # With r = 1 the union is one item per cluster, which k-means would return as the centroids;
    # Vo et al.'s code skips resampling for r <= 1 too (their web config uses it to turn it off).
    for step in range(1, steps + 1 if r >= 2 else 1):
        chosen = _closest_per_cluster(result.assignments, result.distances, r)
        if len(chosen) < k:
            raise ValueError(f"level {level + 1}: resampling kept {len(chosen)} items for k={k}; raise sample_size")
        centroids = kmeans(items[chosen], k, niter=niter, seed=_sub_seed(seed, level, step), gpu=gpu).centroids
        result = assign(items, centroids, gpu=gpu)
    return Level(result.centroids, result.assignments, result.distances)


def _per_level(value: int | Sequence[int], count: int, name: str) -> list[int]:
    values = [value] * count if isinstance(value, (int, np.integer)) else list(value)
    if len(values) != count:
        raise ValueError(f"{name} needs one value per level ({count}), got {len(values)}")
    return [int(v) for v in values]


def hierarchical_kmeans(x: np.ndarray, levels: Sequence[int], *, resampling_steps: int | Sequence[int] = 10,
                        sample_size: int | Sequence[int] | None = None, niter: int = 20, seed: int = 0,
                        gpu: bool | None = None) -> Hierarchy:
    """Hierarchical k-means with resampling (Vo et al. Algorithm 1). ``levels[t]`` clusters at level
    t + 1: the data points first, then the previous level's centroids. Per level (or one value for
    all), ``resampling_steps`` steps keep the ``sample_size`` items closest to each centroid; the
    default sample size is half the mean cluster size, as in Vo et al.'s released configs. Each step
    reassigns every item of its level, so on large pools the first level is where it costs; Vo et al.
    skip it there for their web pool (``resampling_steps=[0, 10, ...]`` does the same)."""
    steps = _per_level(resampling_steps, len(levels), "resampling_steps")
    sizes = None if sample_size is None else _per_level(sample_size, len(levels), "sample_size")
    items = _as_float32(x)
    built: list[Level] = []
    for t, k in enumerate(levels):
        r = sizes[t] if sizes is not None else len(items) // (2 * k)
        built.append(_cluster_level(items, k, steps[t], r, niter, seed, t, gpu))
        items = built[-1].centroids
    return Hierarchy(tuple(built))


def _water_fill(sizes: np.ndarray, quotas: np.ndarray, groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Split ``quotas[g]`` among the items of group g, item i taking at most ``sizes[i]``: every
    item gets min(size, cap) with the highest cap the quota allows (small items give everything,
    the rest is shared by the others), and what integer rounding leaves goes one each to the
    unsaturated items of lowest ``keys``. Vectorised over groups: O(M log M) for M items."""
    order = np.lexsort((sizes, groups))
    g, s = groups[order], sizes[order].astype(np.int64)
    rank = _rank_in_groups(g)
    counts = np.bincount(g, minlength=len(quotas))
    before = np.cumsum(s) - s
    before -= before[np.arange(len(g)) - rank]
    # Sorted by size, item i saturates once the quota reaches what the group takes when capped at
    # its size: the smaller items in full plus s_i for itself and each larger item.
    full = before + s * (counts[g] - rank) <= quotas[g]
    given = np.rint(np.bincount(g, weights=np.where(full, s, 0), minlength=len(quotas))).astype(np.int64)
    unsaturated = counts - np.bincount(g[full], minlength=len(quotas))
    left = quotas - given
    cap = left // np.maximum(unsaturated, 1)
    extra = left - cap * unsaturated
    alloc = np.where(full, s, cap[g])
    candidates = np.flatnonzero(~full)
    candidates = candidates[np.lexsort((keys[order][candidates], g[candidates]))]
    winners = candidates[_rank_in_groups(g[candidates]) < extra[g[candidates]]]
    alloc[winners] += 1
    out = np.empty_like(alloc)
    out[order] = alloc
    return out


def balanced_sample(hierarchy: Hierarchy, n: int, *, seed: int = 0, strategy: str = "random") -> np.ndarray:
    """n unique data indices (sorted), spread evenly over the tree top-down (Vo et al. §4,
    hierarchical sampling): water-fill n over the top clusters by their point counts, each cluster's
    share over its children, down to the points of each first-level cluster, taken at random
    (``"random"``) or nearest its centroid first (``"closest"``). Ties in rounding go to random
    clusters; all randomness comes from ``seed``."""
    if strategy not in ("random", "closest"):
        raise ValueError(f"strategy must be 'random' or 'closest', got {strategy!r}")
    if not 0 <= n <= hierarchy.num_points:
        raise ValueError(f"need 0 <= n <= {hierarchy.num_points}, got {n}")
    rng = np.random.default_rng(seed)
    sizes = hierarchy.cluster_sizes()
    top = len(sizes[-1])
    quotas = _water_fill(sizes[-1], np.array([n], dtype=np.int64), np.zeros(top, dtype=np.int64), rng.random(top))
    for t in range(len(sizes) - 1, 0, -1):
        quotas = _water_fill(sizes[t - 1], quotas, hierarchy.levels[t].parents, rng.random(len(sizes[t - 1])))
    first = hierarchy.levels[0]
    keys = rng.random(hierarchy.num_points) if strategy == "random" else first.distances
    taken = _water_fill(np.ones(hierarchy.num_points, dtype=np.int64), quotas, first.parents, keys)
    return np.flatnonzero(taken)


def cluster_entropy(assignments: np.ndarray, k: int) -> float:
    """Shannon entropy (nats) of the cluster-size distribution; log(k) when perfectly flat."""
    counts = np.bincount(np.asarray(assignments, dtype=np.int64), minlength=k)
    if len(counts) != k:
        raise ValueError(f"assignments reach cluster {len(counts) - 1} >= k={k}")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def size_histogram(assignments: np.ndarray, k: int, bins: int | Sequence[float]) -> dict:
    """Cluster-size summary for the curation report: histogram of the k cluster sizes
    (``np.histogram`` bins), min/median/max size, empty clusters and entropy vs its maximum."""
    sizes = np.bincount(np.asarray(assignments, dtype=np.int64), minlength=k)
    counts, edges = np.histogram(sizes, bins=bins)
    return {"clusters": int(k), "points": int(sizes.sum()), "empty": int((sizes == 0).sum()),
            "min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
            "entropy": cluster_entropy(assignments, k), "max_entropy": float(np.log(k)),
            "bin_edges": edges.tolist(), "counts": counts.tolist()}
