import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dinoforge.curation.search import (build_ivfpq, exact_knn, recall_at_k, retrieve_neighbours,
                                       sample_seed_clusters, search, suggest_ivfpq_params)

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval_ivfpq.py"


def plain_knn(queries, database, k, metric):
    """Full float64 score matrix and a stable argsort: equal scores keep the lower index."""
    q, x = queries.astype(np.float64), database.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        scores = q @ x.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        scores = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def structured(n, dim, clusters, spread, rng):
    """L2-normalised mixture of Gaussians: unit centres plus noise with variances spread²/i
    along the axes (i = 1..dim), so the data has clusters and a decaying spectrum."""
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = spread * rng.standard_normal((n, dim)) / np.sqrt(np.arange(1, dim + 1))
    points = centres[rng.integers(0, clusters, n)] + noise
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 50, 4096])
def test_exact_knn_matches_numpy_argsort(metric, chunk):
    rng = np.random.default_rng(0)
    queries, database = rng.standard_normal((13, 8)), rng.standard_normal((50, 8))
    for k in (1, 5, 50):
        expected_scores, expected_indices = plain_knn(queries, database, k, metric)
        scores, indices = exact_knn(queries, database, k, metric=metric, chunk=chunk)
        assert scores.shape == indices.shape == (13, k) and indices.dtype == np.int64
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk", [2, 3, 100])
def test_exact_knn_ties_go_to_the_lower_index(chunk):
    # Small integers: every dot product and squared distance is exact in float32, so tied
    # rows tie exactly, across chunk boundaries too.
    base = np.array([[1, 0, 2], [0, 3, 1], [2, 2, 0]], np.float32)
    database = base[[0, 1, 0, 2, 1, 0, 2, 2]]
    queries = np.array([[1, 0, 2], [0, 3, 1], [2, 2, 1], [0, 0, 0]], np.float32)
    distances, indices = exact_knn(queries, database, 8, metric="l2", chunk=chunk)
    expected_distances, expected_indices = plain_knn(queries, database, 8, "l2")
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(distances, expected_distances)
    # Query 0 is base 0: distance 0 to rows 0, 2, 5; 9 to base 2 (rows 3, 6, 7); 11 to base 1.
    assert indices[0].tolist() == [0, 2, 5, 3, 6, 7, 1, 4]
    assert distances[0].tolist() == [0, 0, 0, 9, 9, 9, 11, 11]
    # Axis-aligned unit vectors: cosine similarities are exactly 1 or 0.
    eye = np.eye(3, dtype=np.float32)
    similarities, indices = exact_knn(eye[[1]], eye[[0, 1, 2, 1, 0, 1]] * 3, 6, chunk=chunk)
    assert indices.tolist() == [[1, 3, 5, 0, 2, 4]] and similarities.tolist() == [[1, 1, 1, 0, 0, 0]]


def test_exact_knn_rejects_bad_input():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError):
        exact_knn(x, x, 5)
    with pytest.raises(ValueError):
        exact_knn(x, np.zeros((4, 2), np.float32), 1)
    with pytest.raises(ValueError):
        exact_knn(x, x, 1, metric="ip")


def test_recall_at_k_hand_examples():
    approx = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    exact = np.array([[4, 3, 9, 1], [0, 10, 11, 12]])
    assert recall_at_k(approx, exact, 4) == pytest.approx((3 / 4 + 0 / 4) / 2)
    assert recall_at_k(approx, exact, 2) == 0.0  # {1,2} vs {4,3}; {5,6} vs {0,10}
    assert recall_at_k(approx[:, ::-1], exact, 2) == pytest.approx((2 / 2 + 0) / 2)  # {4,3} vs {4,3}
    assert recall_at_k(np.array([[7, -1, -1]]), np.array([[7, 8, 9]]), 3) == pytest.approx(1 / 3)
    assert recall_at_k(exact, exact, 4) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(approx, exact[:, :2], 3)


def test_ivfpq_recall_grows_with_nprobe_and_is_deterministic():
    data = structured(10_300, 8, 200, 0.5, np.random.default_rng(1))
    database, queries = data[:10_000], data[10_000:]
    _, exact = exact_knn(queries, database, 4)
    index = build_ivfpq(database, nlist=64, m=8, seed=0, gpu=False)
    recalls = [recall_at_k(search(index, queries, 4, nprobe)[1], exact, 4) for nprobe in (1, 2, 4, 8, 64)]
    assert all(a <= b for a, b in zip(recalls, recalls[1:])), recalls
    assert recalls[0] < 0.8 and recalls[3] > 0.9, recalls
    # PQ-estimated similarities approximate the exact ones of the returned indices.
    similarities, indices = search(index, queries, 4, 8)
    true = np.einsum("qd,qkd->qk", queries, database[indices])
    assert np.abs(similarities - true).mean() < 0.005
    again = build_ivfpq(database, nlist=64, m=8, seed=0, gpu=False)
    np.testing.assert_array_equal(search(again, queries, 4, 8)[1], indices)


def test_suggest_ivfpq_params():
    assert suggest_ivfpq_params(100_000, 128) == (2048, 64)  # 4·sqrt(1e5) = 1265 -> 2048
    assert suggest_ivfpq_params(100_000_000, 384) == (65536, 96)
    assert suggest_ivfpq_params(20_000, 768) == (512, 96)  # 20000 / 39 = 513 caps nlist
    assert suggest_ivfpq_params(10_000, 6) == (256, 3)  # 10000 / 39 = 256.4; 3 sub-quantizers of 2 dims


def unit(angles_deg):
    radians = np.deg2rad(np.asarray(angles_deg, np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], 1).astype(np.float32)


def test_retrieve_neighbours_hand_made():
    pool = unit([0, 10, 20, 90, 100, 180, 185])
    seeds = unit([4, 96, 12])
    result = retrieve_neighbours(seeds, pool, 2)
    # Seed 0 (4°) -> pool 0 (0°), 1 (10°); seed 1 (96°) -> 4, 3; seed 2 (12°) -> 1, 2.
    assert result.pool_indices.tolist() == [0, 1, 2, 3, 4]
    # Pool 1 (10°) was retrieved by seeds 0 (6° away) and 2 (2° away): seed 2 is closer.
    assert result.seed_indices.tolist() == [0, 2, 2, 1, 1]
    np.testing.assert_allclose(result.similarities, np.cos(np.deg2rad([4, 2, 8, 6, 4])), atol=1e-6)
    # Equal similarity (exactly: 1·a + 0·a = 0·a + 1·a): the lower seed index keeps pool 0.
    tie = retrieve_neighbours(np.eye(2, dtype=np.float32), np.array([[1, 1], [-1, -2]], np.float32), 1)
    assert tie.pool_indices.tolist() == [0] and tie.seed_indices.tolist() == [0]
    assert tie.similarities.tolist() == [pytest.approx(2 ** -0.5)]


def test_retrieve_neighbours_ivfpq_against_exact():
    data = structured(8_200, 8, 200, 0.5, np.random.default_rng(2))
    pool, seeds = data[:8_000], data[8_000:]
    exact = retrieve_neighbours(seeds, pool, 4)
    index = build_ivfpq(pool, nlist=64, m=8, seed=0, gpu=False)
    approx = retrieve_neighbours(seeds, pool, 4, method="ivfpq", index=index, nprobe=16)
    assert np.all(np.diff(approx.pool_indices) > 0)
    overlap = len(np.intersect1d(approx.pool_indices, exact.pool_indices)) / len(exact.pool_indices)
    assert overlap > 0.9, overlap
    # Similarities are exact cosine similarities of the reported pairs, whatever the method.
    true = (seeds[approx.seed_indices] * pool[approx.pool_indices]).sum(1)
    np.testing.assert_allclose(approx.similarities, true, atol=1e-6)
    # Without an index, one is built from the pool with suggest_ivfpq_params: (128, 4) here.
    own = retrieve_neighbours(seeds, pool, 4, method="ivfpq", nprobe=16)
    assert len(np.intersect1d(own.pool_indices, exact.pool_indices)) / len(exact.pool_indices) > 0.85


def test_sample_seed_clusters_caps_and_determinism():
    centroids = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
    assignments = np.array([0, 1, 0, 2, 0, 3, 0, 2, 0, 1, 3])  # cluster 0: 5 images, 2: 2
    seeds = np.array([[1, 1], [0.5, 9], [-1, 0]], np.float32)  # nearest: 0, 2, 0
    picked = sample_seed_clusters(seeds, centroids, assignments, 3, seed=0)
    assert picked.dtype == np.int64 and np.all(np.diff(picked) > 0)
    assert set(picked.tolist()) >= {3, 7}  # cluster 2 fits under the cap: all of it
    from_zero = [i for i in picked.tolist() if assignments[i] == 0]
    assert len(picked) == 5 and len(from_zero) == 3 and set(from_zero) <= {0, 2, 4, 6, 8}
    np.testing.assert_array_equal(sample_seed_clusters(seeds, centroids, assignments, 3, seed=0), picked)
    # Cluster 0's sample depends on (seed, cluster) only, not on the other clusters chosen.
    only_zero = sample_seed_clusters(seeds[[0]], centroids, assignments, 3, seed=0)
    assert only_zero.tolist() == from_zero
    samples = {tuple(sample_seed_clusters(seeds[[0]], centroids, assignments, 3, seed=s)) for s in range(10)}
    assert len(samples) > 1
    assert sample_seed_clusters(seeds, centroids, assignments, 10, seed=0).tolist() == [0, 2, 3, 4, 6, 7, 8]


def test_benchmark_script_reduced_size():
    command = [sys.executable, str(BENCHMARK), "--n", "20000", "--dim", "16", "--queries", "500", "--repeats", "1", "--check"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["n"] == 20000 and summary["queries"] == 500 and summary["k"] == 4 and summary["m"] == 8
    assert summary["recall_at_4"] >= 0.9
    assert summary["speedup"] > 0
    assert summary["speedup"] == pytest.approx(summary["exact_s"] / summary["ivfpq_s"])
    # The table row of the chosen nprobe shows the same recall.
    row = next(line.split() for line in lines[1:-1] if line.split()[0] == str(summary["nprobe"]))
    assert float(row[1]) == pytest.approx(summary["recall_at_4"], abs=1e-4)
