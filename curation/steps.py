"""Curation steps that read and write a curation directory (any fsspec URI), so each runs as
its own command / TorchX role after ``embed``:

* ``cluster_step``: hierarchical k-means over the embeddings -> ``OUT/clusters.npz``;
* ``sample_step``: balanced top-down sample of ``n`` images -> a curated manifest whose
  metadata records the pool (URI + digest), the embedder and every parameter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np

from dinoforge.curation.cluster import Hierarchy, Level, balanced_sample, cluster_entropy, hierarchical_kmeans
from dinoforge.curation.embed import embedding_info, load_embeddings, npz_bytes
from dinoforge.data.manifest import Manifest, creator_info
from dinoforge.data.storage import join


def _write_npz(uri: str, **arrays: np.ndarray) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.pipe_file(path, npz_bytes(arrays))  # one PUT: never a partial file on object stores


def _read_npz(uri: str) -> dict[str, np.ndarray]:
    with fsspec.open(uri, "rb") as handle, np.load(handle, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def cluster_step(out_uri: str, levels: Sequence[int], *, resampling_steps: int = 10, niter: int = 20, seed: int = 0) -> dict[str, Any]:
    """Hierarchical k-means (``levels`` = clusters per level, bottom first) over the embeddings
    in ``out_uri``; writes ``clusters.npz`` (embedding ids + every level) and returns a summary."""
    ids, embeddings, _ = load_embeddings(out_uri)
    hierarchy = hierarchical_kmeans(embeddings.astype(np.float32), list(levels), resampling_steps=resampling_steps,
                                    niter=niter, seed=seed)
    arrays: dict[str, np.ndarray] = {"ids": ids}
    for i, level in enumerate(hierarchy.levels):
        arrays |= {f"centroids_{i}": level.centroids, f"parents_{i}": level.parents, f"distances_{i}": level.distances}
    params = {"levels": list(levels), "resampling_steps": resampling_steps, "niter": niter, "seed": seed}
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


def sample_step(out_uri: str, n: int, manifest_out: str, *, strategy: str = "random", seed: int = 0) -> dict[str, Any]:
    """Balanced top-down sample of ``n`` pool images from ``clusters.npz`` written as a curated
    manifest (pool rows in pool order) at ``manifest_out``; returns a summary."""
    ids, hierarchy, cluster_params = read_clusters(out_uri)
    info = embedding_info(out_uri)
    picked = np.sort(ids[balanced_sample(hierarchy, n, seed=seed, strategy=strategy)])
    pool = Manifest.read(info["manifest_uri"])
    if pool.digest != info["manifest_digest"]:
        raise ValueError(f"pool manifest {info['manifest_uri']} changed since it was embedded "
                         f"({pool.digest} != {info['manifest_digest']})")
    params = {"n": n, "strategy": strategy, "seed": seed, "cluster": cluster_params}
    metadata = {
        **{key: value for key, value in pool.metadata.items() if key == "classes"},
        "creator": creator_info(f"curate sample {out_uri}"),
        "parents": [{"uri": info["manifest_uri"], "digest": pool.digest}],
        "curation": {"embedder": {"weights": info["weights_uri"], "meta": info["weights_meta"]},
                     "embeddings": out_uri, "sample": params},
    }
    curated = Manifest(pool.table.take(picked), metadata)
    curated.write(manifest_out)
    return {"step": "sample", "manifest": manifest_out, "digest": curated.digest, "images": len(curated),
            "pool_images": len(pool), **params}
