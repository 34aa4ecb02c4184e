"""Embedding a manifest for curation (issue 6): the stored embeddings equal CLS features
computed directly, unusable images are recorded, 3 workers write the same bytes as 1, an
interrupted run recomputes only its missing chunks, and other settings are refused."""

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from dinoforge.config import DataConfig
from dinoforge.curation.embed import embed_manifest, embedding_info, iter_embedding_chunks, load_embeddings
from dinoforge.data.importers import import_images
from dinoforge.data.manifest import Manifest
from dinoforge.data.sources import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
from dinoforge.eval.features import cls_features, prepare_image
from dinoforge.export import build_from_meta, load_backbone

N_IMAGES = 200
CHUNK_ROWS = 32  # 201 manifest rows -> 7 chunks, the last of 9 rows
BATCH = 8  # 4 batches per full chunk
N_CHUNKS = 7
# float16 rounds a value in [-1, 1] to within half its spacing there, 2**-12; float32
# differences between batchings are far smaller (1e-5 allows for them).
FP16_TOLERANCE = 2**-12 + 1e-5


@dataclass
class Pool:
    manifest_uri: str
    ok_rows: list[int]  # manifest rows whose image is usable
    ok_images: list[int]  # their Fashion-MNIST test index
    skipped: list[tuple[int, str]]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Pool:
    """200 Fashion-MNIST test images as PNGs, plus one truncated PNG (passes import's header
    check, fails decoding); after the import one image is overwritten (hash mismatch)."""
    root = tmp_path_factory.mktemp("pool") / "images"
    root.mkdir()
    dataset = FashionMNIST(DataConfig().fashion_mnist_root, "test")
    for index in range(N_IMAGES):
        Image.fromarray(dataset.images[index].numpy()).save(root / f"{index:04d}.png")
    whole = (root / "0007.png").read_bytes()
    (root / "0007_cut.png").write_bytes(whole[: len(whole) // 2])  # sorts right after 0007.png: row 8
    manifest = import_images(str(root)).manifest
    (root / "0100.png").write_bytes((root / "0101.png").read_bytes())  # row 101
    uri = str(root.parent / "pool.parquet")
    manifest.write(uri)
    names = [Path(manifest.row(r)["uri"]).stem for r in range(len(manifest))]
    assert len(names) == N_IMAGES + 1 and names[8] == "0007_cut" and names[101] == "0100"
    skipped = [(8, "truncated"), (101, "hash_mismatch")]
    ok_rows = [r for r in range(len(names)) if r not in dict(skipped)]
    return Pool(uri, ok_rows, [int(names[r]) for r in ok_rows], skipped)


def export_random_backbone(path: Path, seed: int) -> str:
    """A seeded random ViT (dim 32, depth 2, patch 4, 28 px) saved like ``dinoforge export``."""
    meta = {"arch": "test_pico", "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 28,
            "in_chans": 3, "num_register_tokens": 0, "ffn_layer": "mlp", "layerscale_init": 1.0,
            "interpolate_offset": 0.1, "interpolate_antialias": False, "image_size": 28, "resize_size": 28,
            "mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD)}
    torch.manual_seed(seed)
    torch.save(build_from_meta(meta).state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return export_random_backbone(tmp_path_factory.mktemp("weights") / "pico.pth", seed=5)


@pytest.fixture(scope="module")
def single(pool, weights, tmp_path_factory) -> tuple[Path, dict]:
    """One worker's complete run."""
    out = tmp_path_factory.mktemp("single")
    return out, embed_manifest(pool.manifest_uri, weights, str(out), rank=0, world=1, chunk_rows=CHUNK_ROWS,
                               batch_size=BATCH, device="cpu")


def chunk_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "embeddings").glob("chunk_*.npz"))}


def test_embeddings_equal_cls_features_and_bad_images_are_recorded(pool, weights, single):
    out, summary = single
    assert summary["computed"] == list(range(N_CHUNKS)) and summary["already_done"] == []
    assert (summary["rows_embedded"], summary["rows_skipped"]) == (N_IMAGES - 1, 2)

    ids, embeddings, skipped = load_embeddings(str(out))
    assert ids.dtype == np.int64 and ids.tolist() == pool.ok_rows
    assert skipped == pool.skipped
    assert embeddings.dtype == np.float16 and embeddings.shape == (N_IMAGES - 1, 32)

    backbone, meta = load_backbone(weights)
    images = FashionMNIST(DataConfig().fashion_mnist_root, "test").images
    prepared = torch.stack([prepare_image(images[i][None], 28, 28, meta["mean"], meta["std"]) for i in pool.ok_images])
    expected = cls_features(backbone, prepared).numpy()
    assert np.abs(embeddings.astype(np.float32) - expected).max() <= FP16_TOLERANCE
    assert np.abs(np.linalg.norm(embeddings.astype(np.float32), axis=1) - 1).max() < 2e-3

    info = embedding_info(str(out))
    assert info["manifest_digest"] == Manifest.read(pool.manifest_uri).digest and info["num_rows"] == N_IMAGES + 1
    assert info["weights_uri"] == f"file://{weights}" and info["weights_meta"] == meta
    assert (info["chunk_rows"], info["num_chunks"], info["dim"], info["dtype"]) == (CHUNK_ROWS, N_CHUNKS, 32, "float16")

    with np.load(out / "embeddings" / "chunk_000006.npz") as last:  # rows 192..200
        assert last["rows"].tolist() == [192, 201] and last["ids"].tolist() == list(range(192, 201))
    sizes = [len(ids) for ids, _, _ in iter_embedding_chunks(str(out))]
    assert sizes == [31, 32, 32, 31, 32, 32, 9]  # chunk 0 lost row 8, chunk 3 row 101


def test_three_workers_write_the_same_bytes_as_one(pool, weights, single, tmp_path, monkeypatch):
    out, _ = single
    sharded = tmp_path / "sharded"
    summaries = {}
    for rank in (2, 1):  # rank 0 (which writes meta.json) comes last
        summaries[rank] = embed_manifest(pool.manifest_uri, weights, str(sharded), rank=rank, world=3,
                                         chunk_rows=CHUNK_ROWS, batch_size=BATCH, device="cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    summaries[0] = embed_manifest(pool.manifest_uri, weights, str(sharded), chunk_rows=CHUNK_ROWS, batch_size=BATCH,
                                  device="cpu")
    for rank, summary in summaries.items():
        assert (summary["rank"], summary["world"]) == (rank, 3)
        assert summary["computed"] == [c for c in range(N_CHUNKS) if c % 3 == rank]
    assert sum(s["rows_embedded"] for s in summaries.values()) == N_IMAGES - 1

    reference = chunk_bytes(out)
    assert len(reference) == N_CHUNKS and chunk_bytes(sharded) == reference
    assert embedding_info(str(sharded))["lineage"] == embedding_info(str(out))["lineage"]
    for a, b in zip(load_embeddings(str(sharded)), load_embeddings(str(out))):
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        else:
            assert a == b


def test_interrupted_run_recomputes_only_missing_or_partial_chunks(pool, weights, single, tmp_path):
    out, _ = single
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "embeddings" / "chunk_000002.npz").unlink()  # never written
    partial = resumed / "embeddings" / "chunk_000005.npz"
    partial.write_bytes(partial.read_bytes()[:1000])  # a local write cut short by a crash

    def run() -> dict:
        return embed_manifest(pool.manifest_uri, weights, str(resumed), chunk_rows=CHUNK_ROWS, batch_size=BATCH,
                              device="cpu", rank=0, world=1)

    summary = run()
    assert summary["computed"] == [2, 5] and summary["already_done"] == [0, 1, 3, 4, 6]
    assert summary["rows_embedded"] == 2 * CHUNK_ROWS
    assert chunk_bytes(resumed) == chunk_bytes(out)
    assert run()["computed"] == []


def test_other_settings_on_existing_output_are_refused(pool, weights, single, tmp_path):
    out, _ = single
    before = chunk_bytes(out)
    other = export_random_backbone(tmp_path / "other.pth", seed=6)
    with pytest.raises(ValueError, match="chunk_rows: 32 there, 64 now"):
        embed_manifest(pool.manifest_uri, weights, str(out), rank=0, world=1, chunk_rows=64, batch_size=BATCH)
    with pytest.raises(ValueError, match="weights_uri"):
        embed_manifest(pool.manifest_uri, other, str(out), rank=0, world=1, chunk_rows=CHUNK_ROWS, batch_size=BATCH)

    # Without meta.json (rank 0 has not written it yet) each chunk's own lineage still refuses mixing.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "embeddings" / "meta.json").unlink()
    with pytest.raises(ValueError, match="chunk_000001.npz was computed with other settings"):
        embed_manifest(pool.manifest_uri, other, str(copy), rank=1, world=2, chunk_rows=CHUNK_ROWS, batch_size=BATCH)
    assert chunk_bytes(out) == before and chunk_bytes(copy) == before


def test_manifest_and_output_on_s3(pool, weights, single, s3_prefix):
    out, _ = single
    manifest_uri = f"{s3_prefix}/pool.parquet"
    fs, _ = fsspec.core.url_to_fs(s3_prefix)
    fs.pipe_file(manifest_uri, Path(pool.manifest_uri).read_bytes())
    remote = f"{s3_prefix}/run"

    def run() -> dict:
        return embed_manifest(manifest_uri, weights, remote, rank=0, world=1, chunk_rows=CHUNK_ROWS, batch_size=BATCH,
                              device="cpu")

    assert run()["computed"] == list(range(N_CHUNKS))
    assert {name: fs.cat_file(f"{remote}/embeddings/{name}") for name in chunk_bytes(out)} == chunk_bytes(out)
    assert run()["computed"] == []
    ids, embeddings, skipped = load_embeddings(remote)
    assert ids.tolist() == pool.ok_rows and skipped == pool.skipped
    assert np.array_equal(embeddings, load_embeddings(str(out))[1])


def test_three_torchrun_workers_through_the_cli_equal_one(pool, weights, single, tmp_path):
    """`dinoforge curate embed` as three parallel processes (torchrun sets RANK/WORLD_SIZE, as
    a TorchX role with three replicas does): the same chunk bytes as one worker."""
    out, _ = single
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "dinoforge.cli",
               "curate", "embed", pool.manifest_uri, "--weights", weights, "--out", str(tmp_path),
               "--chunk-rows", str(CHUNK_ROWS), "--batch-size", str(BATCH), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted((s["rank"], s["world"]) for s in summaries) == [(0, 3), (1, 3), (2, 3)]
    assert chunk_bytes(tmp_path) == chunk_bytes(out)
