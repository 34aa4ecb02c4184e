"""embed -> cluster -> sample through the CLI on real images: the curated manifest's rows,
lineage metadata, and the same manifest from one worker and from three parallel workers."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dinoforge.cli import main
from dinoforge.config import DataConfig
from dinoforge.curation.cluster import cluster_entropy
from dinoforge.curation.steps import read_clusters
from dinoforge.data.importers import import_images
from dinoforge.data.manifest import Manifest
from dinoforge.data.sources import FashionMNIST
from test_curation_embed import export_random_backbone

N_POOL = 600


@pytest.fixture(scope="module")
def pool_manifest(tmp_path_factory) -> str:
    """600 Fashion-MNIST train images with a long-tailed class mix (class c keeps ~1/(c+1))."""
    root = tmp_path_factory.mktemp("pool") / "images"
    data = FashionMNIST(DataConfig().fashion_mnist_root, "train")
    keep = [i for i in range(20000) if i % (int(data.labels[i]) + 1) == 0][:N_POOL]
    for index in keep:
        folder = root / str(int(data.labels[index]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[index].numpy()).save(folder / f"{index:05d}.png")
    uri = str(root.parent / "pool.parquet")
    import_images(str(root)).manifest.write(uri)
    return uri


def curate(out, manifest_out, capsys) -> list[dict]:
    results = []
    for argv in (["curate", "cluster", str(out), "--levels", "30", "6", "--resampling-steps", "3"],
                 ["curate", "sample", str(out), "--n", "120", "--manifest-out", str(manifest_out)]):
        assert main(argv) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    return results


def test_embed_cluster_sample_one_worker_equals_three(pool_manifest, tmp_path, capsys):
    weights = export_random_backbone(tmp_path / "w.pth", seed=1)
    one, three = tmp_path / "one", tmp_path / "three"
    assert main(["curate", "embed", pool_manifest, "--weights", weights, "--out", str(one), "--chunk-rows", "128"]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "dinoforge.cli",
               "curate", "embed", pool_manifest, "--weights", weights, "--out", str(three), "--chunk-rows", "128"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    capsys.readouterr()

    cluster, sample = curate(one, tmp_path / "one.parquet", capsys)
    _, sample3 = curate(three, tmp_path / "three.parquet", capsys)
    assert sample3["digest"] == sample["digest"]  # the same curated manifest
    assert cluster["points"] == N_POOL and sample["images"] == 120 and sample["pool_images"] == N_POOL

    curated, pool = Manifest.read(str(tmp_path / "one.parquet")), Manifest.read(pool_manifest)
    uris = curated.table.column("uri").to_pylist()
    assert len(set(uris)) == 120 and set(uris) <= set(pool.table.column("uri").to_pylist())
    assert curated.metadata["parents"] == [{"uri": "file://" + pool_manifest, "digest": pool.digest}]  # canonical URI
    assert curated.metadata["curation"]["sample"]["cluster"]["levels"] == [30, 6]
    assert curated.metadata["curation"]["embedder"]["weights"].endswith("w.pth")

    # The curated set is spread more evenly over the top clusters than the pool is.
    ids, hierarchy, _ = read_clusters(str(one))
    top = hierarchy.point_clusters()[:, -1]
    picked = np.isin(ids, [pool.table.column("uri").to_pylist().index(u) for u in uris])
    assert cluster_entropy(top[picked], 6) > cluster_entropy(top, 6)
