"""Curation steps that read and write a curation directory (any fsspec URI), so each runs as
its own command / TorchX role after ``embed`` (which is the sharded one: every per-image cost,
decoding, embedding and de-duplication signatures, is paid there):

* ``dedup_step``: the three de-duplication steps on the stored signatures (or embeddings) ->
  ``OUT/dedup.json``, every removal with the row it duplicates;
* ``cluster_step``: hierarchical k-means over the embeddings of the rows that survived
  de-duplication -> ``OUT/clusters.npz``;
* ``sample_step``: balanced top-down sample of ``n`` images -> a curated manifest;
* ``retrieve_step``: pool images near a seed set (k-NN per seed, or the seeds' clusters) -> a
  curated manifest.

Curated manifests' metadata record the pool (URI + digest), the seeds, the embedder, the
de-duplication and every parameter. The global steps (dedup, cluster, sample, retrieve) run in
one process: each needs all rows at once, and costs far less than embedding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np

from dinoforge.curation import DEDUP_METHODS
from dinoforge.curation.cluster import Hierarchy, Level, balanced_sample, cluster_entropy, hierarchical_kmeans
from dinoforge.curation.dedup import COPY_EVAL_K, COPY_EVAL_THRESHOLD, COPY_K, COPY_THRESHOLD, MAX_HAMMING, PAPER_EVAL_THRESHOLD, PAPER_K, \
    PAPER_THRESHOLD, deduplicate
from dinoforge.curation.embed import embedding_info, iter_chunks, load_embeddings, load_signatures, npz_bytes
from dinoforge.curation.search import build_ivfpq, exact_knn, recall_at_k, retrieve_neighbours, sample_seed_clusters, search, \
    suggest_ivfpq_params
from dinoforge.data.manifest import Manifest, creator_info
from dinoforge.data.storage import join


def _write_npz(uri: str, **arrays: np.ndarray) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.pipe_file(path, npz_bytes(arrays))  # one PUT: never a partial file on object stores


def _read_npz(uri: str) -> dict[str, np.ndarray]:
    with fsspec.open(uri, "rb") as handle, np.load(handle, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def checked_manifest(info: dict[str, Any]) -> Manifest:
    """The manifest an embedding ``info`` (or a dedup.json's pool/eval entry) names, refusing
    one that changed since then."""
    pool = Manifest.read(info["manifest_uri"])
    if pool.digest != info["manifest_digest"]:
        raise ValueError(f"manifest {info['manifest_uri']} changed since it was embedded "
                         f"({pool.digest} != {info['manifest_digest']})")
    return pool


def _same_embedder(pool_info: dict[str, Any], other_info: dict[str, Any], what: str) -> None:
    if (pool_info["weights_uri"], pool_info["weights_meta"]) != (other_info["weights_uri"], other_info["weights_meta"]):
        raise ValueError(f"{what} were embedded with {other_info['weights_uri']}, the pool with {pool_info['weights_uri']}: "
                         "similarities across embedders mean nothing; embed both with the same weights")


def read_dedup(out_uri: str) -> dict[str, Any] | None:
    """``OUT/dedup.json`` written by ``dedup_step``, or None when de-duplication was not run."""
    fs, path = fsspec.core.url_to_fs(join(out_uri, "dedup.json"))
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def dedup_step(out_uri: str, *, eval_uri: str | None = None, method: str = "copy", max_hamming: int = MAX_HAMMING,
               k: int | None = None, threshold: float | None = None, eval_threshold: float | None = None,
               index: str = "flat") -> dict[str, Any]:
    """De-duplicates the pool embedded in ``out_uri`` (``dedup.deduplicate``) and removes copies
    of the evaluation images embedded in ``eval_uri`` (``curate embed`` of the evaluation
    manifest); writes ``OUT/dedup.json`` and returns its counts. ``method``: ``copy`` (the
    hand-built copy matcher on the stored thumbnails; measured on planted copies),
    ``embedding`` (the paper's k-NN graph on the stored embeddings: for a copy-detection
    embedder) or ``hash`` (the pHash steps alone: exact and near-exact copies, for when neither
    fits, e.g. a stand-in embedder on a large pool)."""
    if method not in DEDUP_METHODS:
        raise ValueError(f"method must be one of {DEDUP_METHODS}, got {method!r}")
    info = embedding_info(out_uri)
    pool = checked_manifest(info)
    ids, signatures = load_signatures(out_uri)
    emb = load_embeddings(out_uri)[1].astype(np.float32) if method == "embedding" else None
    evaluation = eval_ids = eval_emb = eval_manifest = None
    if eval_uri is not None:
        eval_info = embedding_info(eval_uri)
        if method == "embedding":
            _same_embedder(info, eval_info, "evaluation images")
            eval_emb = load_embeddings(eval_uri)[1].astype(np.float32)
        eval_manifest = checked_manifest(eval_info)
        eval_ids, evaluation = load_signatures(eval_uri)
    defaults = {
        "embedding": {"k": PAPER_K, "threshold": PAPER_THRESHOLD, "eval_threshold": PAPER_EVAL_THRESHOLD},
        "copy": {"k": COPY_K, "eval_k": COPY_EVAL_K, "threshold": COPY_THRESHOLD, "eval_threshold": COPY_EVAL_THRESHOLD},
        "hash": {},
    }[method]
    overrides = {"k": k, "threshold": threshold, "eval_threshold": eval_threshold} if method != "hash" else {}
    params = {"max_hamming": max_hamming, "index": index, **defaults,
              **{key: value for key, value in overrides.items() if value is not None}}
    result = deduplicate(signatures, evaluation, emb=emb, eval_emb=eval_emb,
                         max_hamming=max_hamming, k=params.get("k"), threshold=params.get("threshold"),
                         eval_threshold=params.get("eval_threshold"), index=index, near=method != "hash")
    removed = [{"row": int(ids[r]), "step": "hash", "duplicate_of": int(ids[kept]), "similarity": None} for r, kept in result.hash]
    removed += [{"row": int(ids[r]), "step": "near", "duplicate_of": int(ids[kept]), "similarity": round(float(sim), 6)}
                for r, kept, sim in result.near]
    removed += [{"row": int(ids[r]), "step": "eval_hash", "duplicate_of": int(eval_ids[e]), "similarity": None}
                for r, e in result.eval_hash]
    removed += [{"row": int(ids[r]), "step": "eval", "duplicate_of": int(eval_ids[e]), "similarity": round(float(sim), 6)}
                for r, e, sim in result.eval]
    removed.sort(key=lambda item: item["row"])
    counts = {"pool": info["num_rows"], "skipped": info["num_rows"] - len(ids),
              **{key: value for key, value in result.counts.items() if key != "pool"}}
    report = {"format_version": 1, "method": method, "params": params,
              "pool": {"uri": info["manifest_uri"], "digest": pool.digest},
              "eval": None if eval_manifest is None else {"uri": eval_info["manifest_uri"], "digest": eval_manifest.digest},
              "counts": counts, "removed": removed}
    fs, path = fsspec.core.url_to_fs(join(out_uri, "dedup.json"))
    fs.pipe_file(path, json.dumps(report, indent=1).encode())
    return {"step": "dedup", "method": method, **counts, "params": params}


def kept_rows(out_uri: str) -> np.ndarray:
    """The embedded pool rows that de-duplication kept (all of them when it was not run),
    read from the chunks' ids alone."""
    ids = np.concatenate([np.zeros(0, np.int64)] + [chunk["ids"] for chunk in iter_chunks(out_uri, ("ids",))])
    dedup = read_dedup(out_uri)
    return ids if dedup is None else ids[~np.isin(ids, [item["row"] for item in dedup["removed"]])]


def _clustered_rows(out_uri: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(rows, float32 embeddings) of ``kept_rows``, and whether de-duplication ran."""
    ids, embeddings, _ = load_embeddings(out_uri)
    keep = np.isin(ids, kept_rows(out_uri))
    return ids[keep], embeddings[keep].astype(np.float32), read_dedup(out_uri) is not None


def cluster_step(out_uri: str, levels: Sequence[int], *, resampling_steps: int = 10, niter: int = 20, seed: int = 0) -> dict[str, Any]:
    """Hierarchical k-means (``levels`` = clusters per level, bottom first) over the embeddings
    in ``out_uri`` that de-duplication kept (all of them when it was not run); writes
    ``clusters.npz`` (pool rows + every level) and returns a summary."""
    ids, embeddings, deduplicated = _clustered_rows(out_uri)
    hierarchy = hierarchical_kmeans(embeddings, list(levels), resampling_steps=resampling_steps, niter=niter, seed=seed)
    arrays: dict[str, np.ndarray] = {"ids": ids}
    for i, level in enumerate(hierarchy.levels):
        arrays |= {f"centroids_{i}": level.centroids, f"parents_{i}": level.parents, f"distances_{i}": level.distances}
    params = {"levels": list(levels), "resampling_steps": resampling_steps, "niter": niter, "seed": seed,
              "deduplicated": deduplicated}
    arrays["params"] = np.frombuffer(json.dumps(params).encode(), dtype=np.uint8)
    _write_npz(join(out_uri, "clusters.npz"), **arrays)
    sizes = hierarchy.cluster_sizes()
    return {"step": "cluster", "points": len(ids), **params,
            "entropy_nats": [round(cluster_entropy(hierarchy.point_clusters()[:, i], len(s)), 4) for i, s in enumerate(sizes)],
            "empty_clusters": [int((s == 0).sum()) for s in sizes]}


def read_clusters(out_uri: str) -> tuple[np.ndarray, Hierarchy, dict[str, Any]]:
    """(embedding ids, hierarchy, cluster parameters) written by ``cluster_step``."""
    data = _read_npz(join(out_uri, "clusters.npz"))
    count = sum(1 for key in data if key.startswith("centroids_"))
    levels = tuple(Level(data[f"centroids_{i}"], data[f"parents_{i}"], data[f"distances_{i}"]) for i in range(count))
    return data["ids"], Hierarchy(levels), json.loads(data["params"].tobytes())


def _write_curated(info: dict[str, Any], pool: Manifest, rows: np.ndarray, manifest_out: str, out_uri: str, command: str,
                   curation: dict[str, Any], parents: Sequence[dict[str, str]] = ()) -> Manifest:
    """Pool ``rows`` (ascending) as a curated manifest whose metadata record the pool and other
    ``parents``, the embedder, the de-duplication and the step's parameters (``curation``)."""
    dedup = read_dedup(out_uri)
    metadata = {
        **{key: value for key, value in pool.metadata.items() if key == "classes"},
        "creator": creator_info(f"curate {command} {out_uri}"),
        "parents": [{"uri": info["manifest_uri"], "digest": pool.digest}, *parents],
        "curation": {"embedder": {"weights": info["weights_uri"], "meta": info["weights_meta"]}, "embeddings": out_uri,
                     "dedup": None if dedup is None else {key: dedup[key] for key in ("method", "params", "eval", "counts")},
                     **curation},
    }
    curated = Manifest(pool.table.take(rows), metadata)
    curated.write(manifest_out)
    return curated


def sample_step(out_uri: str, n: int, manifest_out: str, *, strategy: str = "random", seed: int = 0) -> dict[str, Any]:
    """Balanced top-down sample of ``n`` pool images from ``clusters.npz`` written as a curated
    manifest (pool rows in pool order) at ``manifest_out``; returns a summary."""
    ids, hierarchy, cluster_params = read_clusters(out_uri)
    info = embedding_info(out_uri)
    pool = checked_manifest(info)
    picked = np.sort(ids[balanced_sample(hierarchy, n, seed=seed, strategy=strategy)])
    params = {"n": n, "strategy": strategy, "seed": seed, "cluster": cluster_params}
    curated = _write_curated(info, pool, picked, manifest_out, out_uri, "sample", {"sample": params})
    return {"step": "sample", "manifest": manifest_out, "digest": curated.digest, "images": len(curated),
            "pool_images": len(pool), **params}


RECALL_QUERIES = 1000  # seeds whose IVF-PQ neighbours are checked against exact search


def retrieve_step(out_uri: str, seeds_uri: str, manifest_out: str, *, method: str = "exact", k: int = 4,
                  per_cluster: int = 10_000, nprobe: int = 32, seed: int = 0) -> dict[str, Any]:
    """Pool images (de-duplicated) retrieved for the seed images embedded in ``seeds_uri`` with
    the pool's embedder, written as a curated manifest. ``exact`` / ``ivfpq``: the ``k``
    nearest per seed (paper App. A: 4; 32 for ImageNet-1k), ``ivfpq`` reporting its recall@k
    against exact search on up to ``RECALL_QUERIES`` seeds; ``clusters`` (small seed sets):
    the pool's bottom-level clusters that contain seeds, up to ``per_cluster`` images each
    (paper: 10,000; needs ``cluster_step``)."""
    info, seeds_info = embedding_info(out_uri), embedding_info(seeds_uri)
    _same_embedder(info, seeds_info, "seed images")
    pool, seeds = checked_manifest(info), checked_manifest(seeds_info)
    seed_emb = load_embeddings(seeds_uri)[1].astype(np.float32)
    params: dict[str, Any] = {"method": method, "seeds": seeds_uri, "seed_images": len(seed_emb)}
    if method == "clusters":
        ids, hierarchy, cluster_params = read_clusters(out_uri)
        if not np.array_equal(kept_rows(out_uri), ids):
            raise ValueError(f"{out_uri}: clusters.npz is older than dedup.json; rerun cluster_step")
        picked = sample_seed_clusters(seed_emb, hierarchy.levels[0].centroids, hierarchy.point_clusters()[:, 0],
                                      per_cluster, seed)
        rows = ids[picked]
        params |= {"per_cluster": per_cluster, "seed": seed, "cluster": cluster_params}
    elif method in ("exact", "ivfpq"):
        ids, emb, _ = _clustered_rows(out_uri)
        index = None
        if method == "ivfpq":
            nlist, m = suggest_ivfpq_params(*emb.shape)
            index = build_ivfpq(emb, nlist=nlist, m=m, seed=seed)
        rows = ids[retrieve_neighbours(seed_emb, emb, k, method=method, index=index, nprobe=nprobe).pool_indices]
        params |= {"k": k}
        if index is not None:
            queries = seed_emb[:RECALL_QUERIES]
            recall = recall_at_k(search(index, queries, k, nprobe)[1], exact_knn(queries, emb, k, metric="cosine")[1], k)
            params |= {"nprobe": nprobe, "seed": seed, "nlist": index.index.nlist, "pq_m": index.index.pq.M,
                       "recall_at_k": round(recall, 4), "recall_queries": len(queries)}
    else:
        raise ValueError(f"method must be 'exact', 'ivfpq' or 'clusters', got {method!r}")
    curated = _write_curated(info, pool, np.sort(rows), manifest_out, out_uri, "retrieve", {"retrieve": params},
                             parents=[{"uri": seeds_info["manifest_uri"], "digest": seeds.digest}])
    return {"step": "retrieve", "manifest": manifest_out, "digest": curated.digest, "images": len(curated),
            "pool_images": len(pool), **params}
