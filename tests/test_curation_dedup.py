"""De-duplication (paper §3 / App. A) and the generated pool with planted copies: the pHash
against an independent DCT, multi-index hashing against brute force, union-find and the keep
rule on hand-made graphs, the k-NN / evaluation steps on hand-made vectors, the separable box
search against direct warping, and the generated pool's ground truth. The acceptance on a
generated pool runs through the CLI in ``test_curation_pipeline.py``."""

import io
import json

import numpy as np
import pytest
import scipy.fft
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from dinoforge.curation import dedup
from dinoforge.curation.pool import load_images, make_pool
from dinoforge.data.decode import DecodeLimits, decode_image
from dinoforge.data.sources import FashionMNIST

FASHION = "/usr/share/datasets/fashion-mnist"


def decoded(image: Image.Image, fmt: str = "PNG", **options) -> torch.Tensor:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return decode_image(buffer.getvalue(), DecodeLimits())


def real_images() -> list[Image.Image]:
    photos = [skimage.data.astronaut(), skimage.data.camera(), skimage.data.coffee(), skimage.data.chelsea(),
              skimage.data.rocket(), skimage.data.coins()]
    fashion = FashionMNIST(FASHION, "test").images.numpy()[:6]
    return [Image.fromarray(p) for p in photos] + [Image.fromarray(x) for x in fashion]


def reference_phash(image: torch.Tensor) -> int:
    """pHash from scipy's orthonormal DCT: the first 64 frequencies after DC, walking the
    anti-diagonals u + v = 1, 2, ... with u rising, bit i set when coefficient i > median."""
    pixels = dedup.resized(dedup.grey_float(image), 32).double().numpy()
    coeffs = scipy.fft.dctn(pixels, norm="ortho")
    walk = [(u, d - u) for d in range(1, 64) for u in range(d + 1) if u < 32 and d - u < 32][:64]
    values = np.array([coeffs[u, v] for u, v in walk])
    return sum(1 << i for i, value in enumerate(values) if value > np.median(values))


def test_phash_equals_reference_dct():
    images = [decoded(image) for image in real_images()]
    assert [int(h) for h in dedup.perceptual_hash(images)] == [reference_phash(image) for image in images]


def test_phash_near_for_jpeg_and_resize_far_for_unrelated():
    originals = real_images()
    hashes = dedup.perceptual_hash([decoded(image) for image in originals])
    edits = {
        "jpeg q30": lambda im: decoded(im, "JPEG", quality=30),
        "resize 0.5x": lambda im: decoded(im.resize((max(16, im.width // 2), max(16, im.height // 2)), Image.Resampling.BICUBIC)),
        "resize 2x": lambda im: decoded(im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC)),
    }
    for name, edit in edits.items():
        distance = dedup.hamming(dedup.perceptual_hash([edit(image) for image in originals]), hashes)
        print(f"{name}: Hamming distance to the original {distance.tolist()}")
        assert distance.max() <= 4  # measured: 0 for the photos, 0-4 for 28 px Fashion-MNIST
    pairwise = dedup.hamming(hashes[:, None], hashes[None, :])[~np.eye(len(hashes), dtype=bool)]
    print(f"unrelated images: Hamming distance >= {pairwise.min()}")
    assert pairwise.min() >= 14  # measured minimum: 14 (two Fashion-MNIST items), photos >= 28


def test_hash_pairs_dense_and_multi_index_equal_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**64, size=300, dtype=np.uint64)
    near = []
    for h in base[:200]:  # planted neighbours 0..8 bits away
        flips = rng.choice(64, size=int(rng.integers(0, 9)), replace=False)
        near.append(h ^ np.uint64(sum(1 << int(b) for b in flips)))
    hashes = np.concatenate([base, np.array(near, dtype=np.uint64)])
    for max_hamming in (0, 2, 5, 8):
        truth = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                 if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= max_hamming}
        for method in ("dense", "multi_index"):
            first, second = dedup.hash_pairs(hashes, max_hamming, method)
            assert set(zip(first.tolist(), second.tolist())) == truth, (method, max_hamming)
    assert len(truth) >= 200  # at 8 bits: at least the planted pairs


def python_components(n: int, edges: list[tuple[int, int]]) -> list[set[int]]:
    """Independent reference: union-find with a dict of parents and recursion-free find."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in edges:
        parent[find(a)] = find(b)
    groups: dict[int, set[int]] = {}
    for x in range(n):
        groups.setdefault(find(x), set()).add(x)
    return sorted(groups.values(), key=min)


def test_union_find_and_keep_rule_on_hand_made_graph():
    edges = [(0, 1), (2, 1), (4, 3), (6, 7), (8, 7), (8, 6)]  # 5 is alone
    roots = dedup.connected_components(9, np.array([a for a, _ in edges]), np.array([b for _, b in edges]))
    assert roots.tolist() == [0, 0, 0, 3, 3, 5, 6, 6, 6]
    assert dedup.keepers(roots).tolist() == [0, 0, 0, 3, 3, 5, 6, 6, 6]
    priority = np.array([1, 5, 2, 0, 0, 9, 3, 3, 1])  # the most pixels wins, ties to the lower index
    assert dedup.keepers(roots, priority).tolist() == [1, 1, 1, 3, 3, 5, 6, 6, 6]

    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 300, size=250), rng.integers(0, 300, size=250)
    roots = dedup.connected_components(300, first, second)
    ours = {}
    for node, root in enumerate(roots.tolist()):
        ours.setdefault(root, set()).add(node)
    assert sorted(ours.values(), key=min) == python_components(300, list(zip(first.tolist(), second.tolist())))
    assert all(root == min(members) for root, members in ours.items())


def test_hash_duplicates_on_hand_made_hashes():
    a = 0
    b = a ^ 0b11  # 2 bits from a
    c = b ^ (1 << 40)  # 1 bit from b, 3 from a
    d = 2**64 - 1  # 64 bits from a
    hashes = np.array([a, b, c, d], dtype=np.uint64)
    assert dedup.hash_duplicates(hashes, 2) == [(1, 0), (2, 0)]  # a-b and b-c chain into one component
    assert dedup.hash_duplicates(hashes, 1) == [(2, 1)]
    assert dedup.hash_duplicates(hashes, 2, priority=np.array([1, 1, 4, 1])) == [(0, 2), (1, 2)]
    assert dedup.hash_matches(hashes[:2], np.array([d, c], dtype=np.uint64), 2) == [(1, 1)]  # a is 3 bits from c


def unit(rows: list[list[float]]) -> np.ndarray:
    x = np.array(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_embedding_duplicates_on_hand_made_vectors():
    emb = unit([[1, 0, 0, 0], [1, 0.3, 0, 0], [0, 1, 0, 0], [0, 1, 0.5, 0], [0, 0, 0, 1], [0, 0.9, 0.5, 0.2]])
    sims = emb @ emb.T
    # edges > 0.6: 0-1 (0.958), 2-3 (0.894), 2-5 (0.851), 3-5 (0.983); 4 alone
    assert sorted((i, j) for i in range(6) for j in range(i + 1, 6) if sims[i, j] > 0.6) == [(0, 1), (2, 3), (2, 5), (3, 5)]
    removed = dedup.embedding_duplicates(emb, k=3, threshold=0.6)
    assert [(r, kept) for r, kept, _ in removed] == [(1, 0), (3, 2), (5, 2)]
    assert [s for *_, s in removed] == pytest.approx([sims[0, 1], sims[3, 5], sims[3, 5]], abs=1e-6)
    kept_by_size = dedup.embedding_duplicates(emb, k=3, threshold=0.6, priority=np.array([1, 2, 1, 1, 1, 3]))
    assert [(r, kept) for r, kept, _ in kept_by_size] == [(0, 1), (2, 5), (3, 5)]
    assert dedup.embedding_duplicates(emb, k=3, threshold=0.99) == []


def test_embedding_duplicates_ivf_equals_flat():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(200, 32))
    emb = np.concatenate([centres, centres[:100] + 0.2 * rng.normal(size=(100, 32))]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    flat = dedup.embedding_duplicates(emb, k=8, threshold=0.9)
    ivf = dedup.embedding_duplicates(emb, k=8, threshold=0.9, index="ivf", nlist=4, nprobe=4)
    # the planted neighbours are at cosine ~0.98 from their centre, random centres below 0.9
    assert [(r, kept) for r, kept, _ in flat] == [(r, kept) for r, kept, _ in ivf] == [(200 + i, i) for i in range(100)]


def test_eval_copies_on_hand_made_vectors():
    pool = unit([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0], [0, 0, 1], [0.5, 0.5, 0.7]])
    evaluation = unit([[1, 0.1, 0], [0, 0.2, 1]])
    sims = pool @ evaluation.T
    expected = [(i, int(sims[i].argmax()), float(sims[i].max())) for i in range(5) if sims[i].max() > 0.45]
    got = dedup.eval_copies(pool, evaluation, threshold=0.45)
    assert [(i, e) for i, e, _ in got] == [(i, e) for i, e, _ in expected] == [(0, 0), (2, 0), (3, 1), (4, 1)]
    assert [s for *_, s in got] == pytest.approx([s for *_, s in expected], abs=1e-6)


def direct_box_rows(image: torch.Tensor, box: list[float], flip: bool, size: int, filters) -> torch.Tensor:
    """Independent reference for box_scores: affine_grid + grid_sample (border), then each
    Gaussian as a 2-D convolution with replicated edges, summed with its weight; unit row."""
    left, top, width, height = box
    theta = torch.tensor([[[width * (-1 if flip else 1), 0, 2 * left + width - 1], [0, height, 2 * top + height - 1]]])
    grid = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
    x = F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = 0
    for weight, sigma in filters:
        radius = int(3 * sigma)
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-t[:, None] ** 2 / (2 * sigma**2) - t[None, :] ** 2 / (2 * sigma**2))
        kernel /= kernel.sum()
        out = out + weight * F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), kernel[None, None])
    row = out.flatten() - out.mean()
    return row / row.norm()


def test_separable_box_scores_equal_direct_warping():
    images = [decoded(image) for image in real_images()[:2] + real_images()[6:8]]
    canon = dedup.Signatures.of(images).canon
    rng = np.random.default_rng(3)
    for filters, size in ((dedup.BLUR, 12), (dedup.BAND, 24)):
        xs = torch.tensor(np.stack([rng.uniform(0, 0.3, (4, 3)), rng.uniform(0.6, 1.0, (4, 3))], axis=-1), dtype=torch.float32)
        ys = torch.tensor(np.stack([rng.uniform(0, 0.3, (4, 2)), rng.uniform(0.6, 1.0, (4, 2))], axis=-1), dtype=torch.float32)
        xs[..., 0] = torch.minimum(xs[..., 0], 1 - xs[..., 1])
        ys[..., 0] = torch.minimum(ys[..., 0], 1 - ys[..., 1])
        flips = torch.tensor([False, True, False, True])
        target = dedup.filtered_rows(canon.flip(0), size, filters)  # each image scored against another
        scores = dedup.box_scores(canon, target, xs, ys, flips, size, filters)
        for p in range(4):
            for a in range(2):
                for b in range(3):
                    box = [xs[p, b, 0].item(), ys[p, a, 0].item(), xs[p, b, 1].item(), ys[p, a, 1].item()]
                    reference = direct_box_rows(canon[p], box, bool(flips[p]), size, filters) @ target[p]
                    assert scores[p, a, b].item() == pytest.approx(reference.item(), abs=1e-4)


def test_generated_pool_ground_truth(tmp_path):
    spec = make_pool(tmp_path / "a", n_base=30, n_copies=14, n_eval_copies=4, n_eval=10, seed=1)
    again = make_pool(tmp_path / "b", n_base=30, n_copies=14, n_eval_copies=4, n_eval=10, seed=1)
    files, files_again = spec.paths() + spec.eval_paths(), again.paths() + again.eval_paths()
    assert spec.truth.read_text() == again.truth.read_text()
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(files, files_again))
    assert len(spec.files) == 48 and len(spec.eval_files) == 10 and len(spec.copy_of) == 14 and len(spec.eval_copy_of) == 4
    truth = json.loads(spec.truth.read_text())
    pool, evaluation = load_images(spec.paths()), load_images(spec.eval_paths())
    assert min(min(image.shape[1:]) for image in pool) >= DecodeLimits().min_side
    assert not set(spec.copy_of.values()) & (set(spec.copy_of) | set(spec.eval_copy_of))  # originals are base images
    for copy, original in spec.copy_of.items():
        assert truth["pool"][copy]["source"] == truth["pool"][original]["source"]
        params, copy_pixels, original_pixels = truth["pool"][copy]["params"], pool[copy], pool[original]
        if truth["pool"][copy]["edits"] == ["crop"]:  # lossless: exactly the recorded region
            left, top, width, height = params["crop"]
            assert torch.equal(copy_pixels, original_pixels[:, top : top + height, left : left + width])
        if truth["pool"][copy]["edits"] == ["flip"]:
            assert torch.equal(copy_pixels, original_pixels.flip(-1))
    for copy, e in spec.eval_copy_of.items():
        assert truth["pool"][copy]["source"] == truth["eval"][e]["source"]
        if truth["pool"][copy]["edits"] == ["flip"]:
            assert torch.equal(pool[copy], evaluation[e].flip(-1))
    sources = [item["source"] for item in truth["pool"] if item["copy_of"] is None and item["eval_copy_of"] is None]
    assert len(set(sources)) == 30 and sum(s.startswith("skimage:") for s in sources) == 15
