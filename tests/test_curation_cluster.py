import faiss
import numpy as np
import pytest

from dinoforge.curation.cluster import (
    Hierarchy,
    Level,
    balanced_sample,
    cluster_entropy,
    hierarchical_kmeans,
    kmeans,
    size_histogram,
)


def nearest_numpy(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent nearest-centroid search in float64: (index, squared distance, gap to the second)."""
    d2 = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    two = np.sort(d2, axis=1)[:, :2]
    return d2.argmin(1), two[:, 0], two[:, 1] - two[:, 0]


def blobs(seed: int, centres: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs (unit std) around ``centres``, shuffled: (x float32, blob labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    return (centres[labels] + rng.normal(size=(len(labels), centres.shape[1]))).astype(np.float32), labels


@pytest.fixture(scope="module")
def long_tail():
    """About 20,000 points in 40 blobs (16-D) with Zipf sizes ~ 1/rank^1.2: largest 6,237, smallest 74."""
    sizes = np.floor(20_000 / np.arange(1, 41) ** 1.2 / (1 / np.arange(1, 41) ** 1.2).sum()).astype(int)
    centres = np.random.default_rng(1).normal(scale=4.0, size=(40, 16))
    return (*blobs(1, centres, sizes.tolist()), centres)


@pytest.fixture(scope="module")
def tree(long_tail):
    """Two levels (200 then 40 clusters), 10 resampling steps each with the default sample size."""
    return hierarchical_kmeans(long_tail[0], [200, 40], seed=0)


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_recovers_separated_blobs(seed):
    # Blob centres 100 * e_i, 141 apart: k-means++ seeds one centroid per blob unless it draws a
    # point of a covered blob, whose squared-distance mass is ~1e-3 of an uncovered one.
    # 250 points per blob: faiss trains on all of them (it subsamples above 256 per centroid), so the
    # converged centroids are exactly the blob means.
    x, labels = blobs(seed, 100.0 * np.eye(6, 8), [250] * 6)
    result = kmeans(x, 6, seed=seed)
    pairs = set(zip(result.assignments.tolist(), labels.tolist()))
    assert len(pairs) == 6 and len({c for c, _ in pairs}) == 6  # a bijection clusters <-> blobs
    for c, blob in pairs:
        np.testing.assert_allclose(result.centroids[c], x[labels == blob].astype(np.float64).mean(0), atol=1e-4)
    nearest, d2, _ = nearest_numpy(x, result.centroids)
    np.testing.assert_array_equal(result.assignments, nearest)
    np.testing.assert_allclose(result.distances, d2, rtol=1e-4, atol=1e-3)


def test_assignments_are_nearest_centroids_on_unstructured_data():
    x = np.random.default_rng(0).random((3000, 16), dtype=np.float32)
    result = kmeans(x, 32, niter=10, seed=0)
    nearest, _, gap = nearest_numpy(x, result.centroids)
    clear = gap > 1e-4  # float32 distances carry ~1e-6 error: only near-ties may flip
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(result.assignments[clear], nearest[clear])


def test_spherical_kmeans_unit_centroids_max_inner_product():
    x = np.random.default_rng(1).normal(size=(2000, 12)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    result = kmeans(x, 10, seed=0, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    sims = x.astype(np.float64) @ result.centroids.T.astype(np.float64)
    top2 = np.sort(sims, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5
    np.testing.assert_array_equal(result.assignments[clear], sims.argmax(1)[clear])


def test_kmeans_deterministic_for_a_seed():
    x = np.random.default_rng(2).normal(size=(5000, 24)).astype(np.float32)
    a, b, other = kmeans(x, 50, seed=7), kmeans(x, 50, seed=7), kmeans(x, 50, seed=8)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    assert not np.array_equal(a.centroids, other.centroids)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        single = kmeans(x, 50, seed=7)
    finally:
        faiss.omp_set_num_threads(threads)
    np.testing.assert_array_equal(a.centroids, single.centroids)
    np.testing.assert_array_equal(a.assignments, single.assignments)


def test_hierarchy_shapes_and_consistency(long_tail, tree):
    x, _, _ = long_tail
    first, second = tree.levels
    assert first.centroids.shape == (200, 16) and first.parents.shape == (len(x),)
    assert second.centroids.shape == (40, 16) and second.parents.shape == (200,)
    # after the last resampling step every item is assigned to its nearest centroid
    nearest, d2, gap = nearest_numpy(x, first.centroids)
    clear = gap > 1e-3
    np.testing.assert_array_equal(first.parents[clear], nearest[clear])
    np.testing.assert_allclose(first.distances, d2, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(second.parents, nearest_numpy(first.centroids, second.centroids)[0])
    # every point's level-2 cluster is the parent of its level-1 cluster
    paths = tree.point_clusters()
    np.testing.assert_array_equal(paths[:, 0], first.parents)
    for i in range(len(x)):
        assert paths[i, 1] == second.parents[paths[i, 0]]
    sizes = tree.cluster_sizes()
    for level, size in enumerate(sizes):
        np.testing.assert_array_equal(size, np.bincount(paths[:, level], minlength=len(tree.levels[level].centroids)))


def test_hierarchical_kmeans_deterministic(long_tail):
    x = long_tail[0][:5000]
    a = hierarchical_kmeans(x, [50, 10], resampling_steps=2, seed=5)
    b = hierarchical_kmeans(x, [50, 10], resampling_steps=2, seed=5)
    for la, lb in zip(a.levels, b.levels):
        np.testing.assert_array_equal(la.centroids, lb.centroids)
        np.testing.assert_array_equal(la.parents, lb.parents)


def test_resampling_spreads_centroids_over_blobs(long_tail, tree):
    """Vo et al. §4: k-means puts centroids where points are dense; resampling moves them towards a
    uniform cover of the support, so the blobs (equal volume) get more equal numbers of centroids."""
    x, _, centres = long_tail
    entropy = {}
    for name, centroids in (("plain", kmeans(x, 200, seed=0).centroids), ("resampled", tree.levels[0].centroids)):
        entropy[name] = cluster_entropy(nearest_numpy(centroids, centres)[0], len(centres))
    print(f"\nentropy of 200 level-1 centroids over 40 blobs: plain k-means {entropy['plain']:.3f}, "
          f"10 resampling steps {entropy['resampled']:.3f} nats (uniform {np.log(40):.3f})")
    assert entropy["resampled"] > entropy["plain"] + 0.1


def test_balanced_sampling_flatter_than_random(long_tail, tree):
    x, labels, _ = long_tail
    n, blobs = 1000, labels.max() + 1
    balanced = balanced_sample(tree, n, seed=0)
    assert len(np.unique(balanced)) == n
    uniform = np.random.default_rng(0).choice(len(x), n, replace=False)
    h_balanced, h_random = cluster_entropy(labels[balanced], blobs), cluster_entropy(labels[uniform], blobs)
    h_closest = cluster_entropy(labels[balanced_sample(tree, n, seed=0, strategy="closest")], blobs)
    print(f"\nentropy of {n} samples over {blobs} ground-truth blobs: random {h_random:.3f}, balanced {h_balanced:.3f}, "
          f"balanced/closest {h_closest:.3f}, uniform {np.log(blobs):.3f} nats")
    # measured: random 2.78, balanced 3.65 (both strategies), uniform 3.69 nats
    assert h_balanced > h_random + 0.5 and h_closest > h_random + 0.5


def hand_tree(level1_sizes: list[int], level2_parents: list[int] | None) -> Hierarchy:
    """A hierarchy built by hand: data points are numbered cluster by cluster; a point's distance to
    its centroid is its position inside the cluster, reversed (so the last points are closest)."""
    parents = np.repeat(np.arange(len(level1_sizes)), level1_sizes)
    distances = np.concatenate([np.arange(size, 0, -1) for size in level1_sizes]).astype(np.float32)
    levels = [Level(np.zeros((len(level1_sizes), 2), np.float32), parents, distances)]
    if level2_parents is not None:
        top = np.zeros((max(level2_parents) + 1, 2), np.float32)
        levels.append(Level(top, np.array(level2_parents), np.zeros(len(level2_parents), np.float32)))
    return Hierarchy(tuple(levels))


def test_allocation_is_water_filled():
    flat = hand_tree([2, 5, 10, 30], None)
    picked = balanced_sample(flat, 21, seed=0)
    # even share 21/4 = 5.25: cluster 0 gives its 2, then 19/3 = 6.3: cluster 1 gives its 5, 14/2 = 7 each
    np.testing.assert_array_equal(np.bincount(flat.levels[0].parents[picked], minlength=4), [2, 5, 7, 7])
    # 20 points: the last unit goes to one of the two big clusters
    counts = np.bincount(flat.levels[0].parents[balanced_sample(flat, 20, seed=0)], minlength=4)
    assert counts[:2].tolist() == [2, 5] and sorted(counts[2:].tolist()) == [6, 7]
    # two levels: top clusters {0, 1, 2} and {3} hold 30 points each, so each gets 15, split 5/5/5 and 15
    two_level = hand_tree([10, 10, 10, 30], [0, 0, 0, 1])
    picked = balanced_sample(two_level, 30, seed=0)
    np.testing.assert_array_equal(np.bincount(two_level.levels[0].parents[picked], minlength=4), [5, 5, 5, 15])


def test_allocation_meets_water_filling_conditions():
    """For any n: clusters not given in full get equal counts (up to one) and no cluster given in
    full is larger than one more than those counts, so no move between clusters could flatten it."""
    sizes = np.random.default_rng(3).zipf(1.5, size=60).clip(max=5000)
    flat = hand_tree(sizes.tolist(), None)
    for n in (1, 59, 60, 333, 1000, int(sizes.sum()) - 1):
        counts = np.bincount(flat.levels[0].parents[balanced_sample(flat, n, seed=n)], minlength=60)
        partial = counts < sizes
        assert counts.sum() == n and np.all(counts <= sizes)
        assert counts[partial].max() - counts[partial].min() <= 1
        assert sizes[~partial].max(initial=0) <= counts[partial].min() + 1


def test_balanced_sample_exact_unique_deterministic_closest():
    two_level = hand_tree([10, 10, 10, 30], [0, 0, 0, 1])
    for n in (0, 1, 17, 30, 59, 60):
        picked = balanced_sample(two_level, n, seed=1)
        assert len(picked) == n and len(np.unique(picked)) == n
    np.testing.assert_array_equal(balanced_sample(two_level, 17, seed=4), balanced_sample(two_level, 17, seed=4))
    first = balanced_sample(two_level, 17, seed=4)
    assert any(not np.array_equal(first, balanced_sample(two_level, 17, seed=s)) for s in range(5, 9))
    # "closest" takes the points nearest each centroid: here the last ones of each cluster
    closest = balanced_sample(two_level, 30, seed=0, strategy="closest")
    np.testing.assert_array_equal(closest, np.r_[5:10, 15:20, 25:30, 45:60])
    with pytest.raises(ValueError):
        balanced_sample(two_level, 61)


def test_entropy_and_histogram_numbers():
    assignments = np.array([0, 0, 1, 1, 1, 1, 3, 3])
    p = np.array([2, 4, 2]) / 8
    assert cluster_entropy(assignments, 4) == pytest.approx(-(p * np.log(p)).sum())
    assert cluster_entropy(np.arange(5), 5) == pytest.approx(np.log(5))
    report = size_histogram(assignments, 4, bins=[0, 1, 3, 5])
    assert report["counts"] == [1, 2, 1] and report["empty"] == 1 and (report["min"], report["max"]) == (0, 4)
    assert report["points"] == 8 and report["median"] == 2.0 and report["max_entropy"] == pytest.approx(np.log(4))
