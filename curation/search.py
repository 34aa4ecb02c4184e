"""Nearest-neighbour search for curation (paper §3 / App. A "Retrieval"): exact chunked
k-NN for small scale, faiss IVF-PQ for large scale, k-recall@k of one against the other, and
the two ways the paper grows a curated set from seed images:

* large seed sets: the ``k`` nearest pool images of every seed image (paper: k = 4; 32 for
  ImageNet-1k), :func:`retrieve_neighbours`;
* small seed sets: the pool k-means clusters that contain seed images, up to 10,000 pool
  images sampled from each (paper App. A), :func:`sample_seed_clusters`.

Scores are "higher is better" inside this module: cosine similarity, or the negated squared
L2 distance; the public functions return cosine similarities or squared L2 distances.
Exact search breaks equal scores by the lower database index, so its output is a function of
the inputs alone.

IVF-PQ parameters (:func:`suggest_ivfpq_params`, defaults of :func:`build_ivfpq`; faiss wiki
"Guidelines to choose an index": nlist between 4·sqrt(N) and 16·sqrt(N), 30·nlist to
256·nlist training vectors):

=========  =====  ==============  =========  ==============================================
vectors N  nlist  training rows   D: m       index memory (codes + int64 ids, m + 8 B/row)
=========  =====  ==============  =========  ==============================================
100k       2048   all 100k        128: 64    7.2 MB
1M         4096   262,144         384: 96    104 MB
10M        16384  1,048,576       384: 96    1.04 GB
100M       65536  4,194,304       384: 96    10.4 GB
=========  =====  ==============  =========  ==============================================

m is the largest code size faiss-gpu's IVF-PQ supports (1-4, 8, 12, ..., 32, 40, 48, 56, 64,
96) that divides D and leaves at least 2 dimensions per sub-quantizer; nbits = 8. Training
rows default to 64 per list (faiss k-means warns below 39) and at least 65,536 for the PQ
codebooks (256 per code, faiss's cap). faiss also keeps an nlist x m x 256 float32 table
for fast L2 search when it fits 2 GiB (``precomputed_table_max_bytes``): at 100M rows it does
not (6.4 GB) and search computes those terms per query instead.

nprobe depends on the data: sweep it on a query sample against :func:`exact_knn` (as
``benchmarks/retrieval_ivfpq.py`` does). Measured on that benchmark's 100k x 128 synthetic
mixture (1000 queries, 2 shared CPU cores): recall@4 = 0.76 at nprobe 1, 0.90 at 8, 0.917 at
16, 0.926 at 64, the plateau set by PQ; 6x faster than exact search at nprobe 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch

Metric = Literal["cosine", "l2"]

# Query rows and database rows per exact-search block: a block's score matrix is
# CHUNK x CHUNK float32 = 64 MiB.
CHUNK = 4096
# Rows normalised and handed to faiss at a time, so the database is never copied whole.
BATCH = 65536
# faiss k-means warns below 39 training points per centroid (Clustering.cpp
# min_points_per_centroid); training uses 64 per IVF list by default.
TRAIN_PER_LIST = 64
# Code sizes (bytes = m at 8 bits) that faiss-gpu's IVF-PQ supports (IVFPQ::isSupportedPQCodeLength),
# largest first.
GPU_PQ_M = (96, 64, 56, 48, 40, 32, 28, 24, 20, 16, 12, 8, 4, 3, 2, 1)


def _check_2d(name: str, x: np.ndarray) -> None:
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {x.shape}")


def _prepare(x: np.ndarray, metric: Metric) -> np.ndarray:
    """float32 copy of ``x``, rows L2-normalised for cosine (zero rows stay zero)."""
    out = np.asarray(x, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.maximum(norms, np.float32(1e-12))
    elif metric != "l2":
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    return out


def _scores(queries: np.ndarray, database: np.ndarray, metric: Metric) -> np.ndarray:
    """(q, n) higher-is-better scores of prepared blocks."""
    dots = queries @ database.T
    if metric == "cosine":
        return dots
    squared = (queries * queries).sum(1)[:, None] - 2 * dots + (database * database).sum(1)[None, :]
    # Rounding can make the expanded |q|² - 2q·x + |x|² slightly negative for near-equal rows.
    return -np.maximum(squared, 0)


def _block_topk(scores: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The min(k, columns) best entries of every row, best first, equal scores by lower
    column; indices are shifted by ``offset``."""
    kk = min(k, scores.shape[1])
    if kk < scores.shape[1]:
        values, cols = (t.numpy() for t in torch.topk(torch.from_numpy(scores), kk + 1, dim=1))
        # topk orders ties arbitrarily. Its top kk are the unique answer unless the (kk+1)-th
        # value equals the kk-th; those rows get a stable sort of the whole row.
        tied = np.flatnonzero(values[:, kk] == values[:, kk - 1])
        if len(tied):
            cols[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :kk + 1]
            values[tied] = np.take_along_axis(scores[tied], cols[tied], 1)
        values, cols = values[:, :kk], cols[:, :kk]
    else:
        values, cols = scores, np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((cols, -values), axis=-1)
    return np.take_along_axis(values, order, 1), np.take_along_axis(cols, order, 1).astype(np.int64) + offset


def _merge(best: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of two candidate lists, equal scores by lower index."""
    values = np.concatenate((best[0], new[0]), axis=1)
    indices = np.concatenate((best[1], new[1]), axis=1)
    order = np.lexsort((indices, -values), axis=-1)[:, :k]
    return np.take_along_axis(values, order, 1), np.take_along_axis(indices, order, 1)


def exact_knn(queries: np.ndarray, database: np.ndarray, k: int, *, metric: Metric = "cosine",
              chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest database rows of every query: (Q, k) float32 cosine similarities
    (descending) or squared L2 distances (ascending), and (Q, k) int64 database indices;
    equal scores are ordered by lower index. Works on ``chunk`` x ``chunk`` blocks, so memory
    is O(chunk² + Q·k) whatever N; ``database`` may be a memory-mapped array. Cost is
    O(Q·N·D): use :func:`build_ivfpq` for large Q·N."""
    _check_2d("queries", queries)
    _check_2d("database", database)
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries have D={queries.shape[1]}, database D={database.shape[1]}")
    if not 1 <= k <= database.shape[0]:
        raise ValueError(f"k must be in [1, {database.shape[0]}] (database size), got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    values = np.empty((queries.shape[0], k), np.float32)
    indices = np.empty((queries.shape[0], k), np.int64)
    for q0 in range(0, queries.shape[0], chunk):
        block = _prepare(queries[q0:q0 + chunk], metric)
        best = (np.empty((len(block), 0), np.float32), np.empty((len(block), 0), np.int64))
        for d0 in range(0, database.shape[0], chunk):
            scores = _scores(block, _prepare(database[d0:d0 + chunk], metric), metric)
            best = _merge(best, _block_topk(scores, k, d0), k)
        values[q0:q0 + chunk], indices[q0:q0 + chunk] = best
    return (values if metric == "cosine" else -values), indices


@dataclass(eq=False)
class IVFPQIndex:
    """A trained and filled faiss IVF-PQ index and how to read its distances."""

    index: faiss.Index  # faiss.IndexIVFPQ, or its GPU clone
    metric: Metric
    # faiss.StandardGpuResources the GPU clone lives on: it must outlive the index.
    resources: object | None = None


def suggest_ivfpq_params(n: int, dim: int) -> tuple[int, int]:
    """(nlist, m) for ``n`` vectors of dimension ``dim``: nlist the power of two at or above
    4·sqrt(n) (within the faiss wiki's 4–16·sqrt(n)), lowered to keep >= 39 vectors per list;
    m the largest faiss-gpu-supported divisor of ``dim`` leaving >= 2 dimensions each."""
    if n < 39 or dim < 2:
        raise ValueError(f"IVF-PQ needs n >= 39 vectors of dim >= 2, got n={n}, dim={dim}")
    nlist = min(2 ** math.ceil(math.log2(4 * math.sqrt(n))), 2 ** math.floor(math.log2(n / 39)))
    m = next(m for m in GPU_PQ_M if dim % m == 0 and dim // m >= 2)
    return nlist, m


def _use_gpu(gpu: bool | None) -> bool:
    available = faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")
    if gpu and not available:
        raise RuntimeError("gpu=True, but this faiss build sees no GPU")
    return available if gpu is None else gpu


def build_ivfpq(database: np.ndarray, *, nlist: int, m: int, nbits: int = 8, metric: Metric = "cosine",
                train_size: int | None = None, seed: int = 0, gpu: bool | None = None) -> IVFPQIndex:
    """Train an IVF-PQ index (``nlist`` lists, ``m`` sub-quantizers of ``nbits`` bits) on
    ``train_size`` database rows sampled with ``seed`` (default min(N, max(64·nlist,
    256·2^nbits))), then add all rows in batches of 65,536. Cosine indexes L2-normalised rows
    under L2, whose order on unit vectors is the cosine order (|a-b|² = 2 - 2·cos). With a GPU
    (``gpu=None``: when faiss sees one) the k-means assignments of training run on it and the
    trained index is cloned to it before adding; the PQ codebooks train on CPU."""
    _check_2d("database", database)
    n, dim = database.shape
    if dim % m:
        raise ValueError(f"m={m} must divide the dimension {dim}")
    train_size = min(n, max(TRAIN_PER_LIST * nlist, 256 * 2**nbits)) if train_size is None else train_size
    if not nlist <= train_size <= n:
        raise ValueError(f"train_size must be in [nlist={nlist}, N={n}], got {train_size}")
    sample = np.sort(np.random.default_rng(seed).choice(n, train_size, replace=False))
    train = _prepare(database[sample], metric)
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, m, nbits)
    index.cp.seed = seed  # coarse k-means
    index.pq.cp.seed = seed  # PQ codebook k-means
    resources = None
    if _use_gpu(gpu):
        resources = faiss.StandardGpuResources()
        clustering = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatL2(dim))
        index.clustering_index = clustering
        index.train(train)
        index.clustering_index = None
        options = faiss.GpuClonerOptions()
        # faiss-gpu IVF-PQ needs each query's m x 2^nbits distance table to fit one block's
        # shared memory (48 KiB per block by default on NVIDIA GPUs); float16 halves it.
        options.useFloat16LookupTables = 4 * m * 2**nbits > 48 * 1024
        index = faiss.index_cpu_to_gpu(resources, 0, index, options)
    else:
        index.train(train)
    for start in range(0, n, BATCH):
        index.add(_prepare(database[start:start + BATCH], metric))
    return IVFPQIndex(index, metric, resources)


def search(index: IVFPQIndex, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k-NN over the ``nprobe`` nearest IVF lists: (Q, k) float32 PQ-estimated
    cosine similarities (descending) or squared L2 distances (ascending), and (Q, k) int64
    indices (-1 where fewer than k vectors were scanned)."""
    _check_2d("queries", queries)
    if k < 1 or nprobe < 1:
        raise ValueError(f"k and nprobe must be >= 1, got k={k}, nprobe={nprobe}")
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    distances = np.empty((queries.shape[0], k), np.float32)
    indices = np.empty((queries.shape[0], k), np.int64)
    for start in range(0, queries.shape[0], BATCH):
        block = _prepare(queries[start:start + BATCH], index.metric)
        distances[start:start + len(block)], indices[start:start + len(block)] = index.index.search(block, k, params=params)
    return (1 - distances / 2 if index.metric == "cosine" else distances), indices


def recall_at_k(approx_indices: np.ndarray, exact_indices: np.ndarray, k: int) -> float:
    """k-recall@k: for every query, |first k approximate ∩ first k exact indices| / k,
    averaged over queries. Rows hold distinct indices (-1 = no result, never matches). When
    exact scores tie at rank k, an approximate result holding the other tied index counts
    as a miss."""
    if approx_indices.ndim != 2 or approx_indices.shape[0] != exact_indices.shape[0] or approx_indices.shape[0] == 0:
        raise ValueError(f"need (Q, >=k) arrays with the same Q >= 1, got {approx_indices.shape}, {exact_indices.shape}")
    if not 1 <= k <= min(approx_indices.shape[1], exact_indices.shape[1]):
        raise ValueError(f"k={k} exceeds the columns {approx_indices.shape[1]}, {exact_indices.shape[1]}")
    found = (approx_indices[:, :k, None] == exact_indices[:, None, :k]).any(axis=1)
    return float(found.sum(axis=1).mean() / k)


@dataclass(frozen=True, eq=False)
class Retrieval:
    """Pool images retrieved for a seed set, one entry per pool image."""

    pool_indices: np.ndarray  # (R,) int64, unique, ascending
    seed_indices: np.ndarray  # (R,) int64: the seed that retrieved it with the highest similarity
    similarities: np.ndarray  # (R,) float32 exact cosine similarity of that seed and pool image


def _pair_cosine(seed_emb: np.ndarray, pool_emb: np.ndarray, seeds: np.ndarray, pools: np.ndarray) -> np.ndarray:
    """Exact cosine similarity of each (seed, pool) pair, BATCH pairs at a time."""
    out = np.empty(len(seeds), np.float32)
    for start in range(0, len(seeds), BATCH):
        s, p = seeds[start:start + BATCH], pools[start:start + BATCH]
        out[start:start + len(s)] = np.einsum("ij,ij->i", _prepare(seed_emb[s], "cosine"), _prepare(pool_emb[p], "cosine"))
    return out


def retrieve_neighbours(seed_emb: np.ndarray, pool_emb: np.ndarray, k_per_seed: int, *,
                        method: Literal["exact", "ivfpq"] = "exact", index: IVFPQIndex | None = None,
                        nprobe: int = 32, seed: int = 0, chunk: int = CHUNK) -> Retrieval:
    """The ``k_per_seed`` cosine-nearest pool images of every seed image (paper: 4; 32 for
    ImageNet-1k), merged: each pool image once, with the seed that is most similar to it
    among the seeds that retrieved it (equal similarity: lower seed index). ``ivfpq`` searches
    ``index`` (built here from ``pool_emb`` with :func:`suggest_ivfpq_params` and ``seed``
    when None); its similarities are recomputed exactly from the embeddings."""
    if method == "exact":
        _, neighbours = exact_knn(seed_emb, pool_emb, k_per_seed, metric="cosine", chunk=chunk)
    elif method == "ivfpq":
        if index is None:
            nlist, m = suggest_ivfpq_params(*pool_emb.shape)
            index = build_ivfpq(pool_emb, nlist=nlist, m=m, metric="cosine", seed=seed)
        if index.metric != "cosine":
            raise ValueError(f"retrieval ranks by cosine similarity; the index uses {index.metric!r}")
        _, neighbours = search(index, seed_emb, k_per_seed, nprobe)
    else:
        raise ValueError(f"method must be 'exact' or 'ivfpq', got {method!r}")
    seeds = np.repeat(np.arange(len(neighbours), dtype=np.int64), neighbours.shape[1])
    pools = neighbours.ravel()
    seeds, pools = seeds[pools >= 0], pools[pools >= 0]
    similarities = _pair_cosine(seed_emb, pool_emb, seeds, pools)
    order = np.lexsort((seeds, -similarities, pools))
    seeds, pools, similarities = seeds[order], pools[order], similarities[order]
    first = np.ones(len(pools), bool)
    first[1:] = pools[1:] != pools[:-1]
    return Retrieval(pools[first], seeds[first], similarities[first])


def sample_seed_clusters(seed_emb: np.ndarray, pool_centroids: np.ndarray, pool_assignments: np.ndarray,
                         per_cluster: int, seed: int, *, metric: Metric = "l2") -> np.ndarray:
    """Pool indices (int64, ascending) of the small-seed-set rule (paper App. A): each seed
    image goes to its nearest pool centroid (``l2``: the k-means assignment rule), and from
    every cluster that received a seed all its pool images are kept when it has at most
    ``per_cluster`` (paper: 10,000), else ``per_cluster`` sampled without replacement by a
    generator seeded with (seed, cluster id), so one cluster's sample does not depend on
    which other clusters were selected."""
    if per_cluster < 1:
        raise ValueError(f"per_cluster must be >= 1, got {per_cluster}")
    assignments = np.asarray(pool_assignments)
    _, nearest = exact_knn(seed_emb, pool_centroids, 1, metric=metric)
    clusters = np.unique(nearest[:, 0])
    members = np.flatnonzero(np.isin(assignments, clusters))
    members = members[np.argsort(assignments[members], kind="stable")]
    bounds = np.searchsorted(assignments[members], np.append(clusters, clusters[-1] + 1))
    chosen = []
    for cluster, lo, hi in zip(clusters, bounds[:-1], bounds[1:]):
        group = members[lo:hi]
        if len(group) > per_cluster:
            group = np.random.default_rng((seed, int(cluster))).choice(group, per_cluster, replace=False)
        chosen.append(group)
    return np.sort(np.concatenate(chosen)).astype(np.int64)
