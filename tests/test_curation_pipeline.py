"""Issue 6 end to end through the CLI on a generated pool (real Fashion-MNIST images and
scikit-image photo tiles plus planted edited copies, ``curate make-pool``): ``curate run`` in
one process against the separate steps with ``curate embed`` sharded over three torchrun
workers (the same dedup.json, curated and retrieved manifests), de-duplication scored against
the planted ground truth from the stored signatures, and the curated manifests' lineage."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoforge.cli import main
from dinoforge.curation.cluster import cluster_entropy
from dinoforge.curation.dedup import Signatures
from dinoforge.curation.embed import load_embeddings, load_signatures
from dinoforge.curation.pool import PoolSpec, load_images
from dinoforge.curation.steps import read_clusters, read_dedup
from dinoforge.data.manifest import Manifest
from test_curation_embed import export_random_backbone


def planted_scores(spec, removed: set[int]) -> tuple[int, int, int]:
    """(found, planted, wrong): a group (an original and its planted copies) of size s has s - 1
    copies; removing up to s - 1 of its members finds that many, every other removal is wrong
    (an image with no planted copy, or the last member of a group)."""
    found = sum(min(sum(m in removed for m in group), len(group) - 1) for group in spec.groups())
    return found, len(spec.copy_of), len(removed) - found


def last_json(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("generated")
    made = subprocess.run([sys.executable, "-m", "dinoforge.cli", "curate", "make-pool", str(root / "pool"), "--n-base", "280",
                           "--n-copies", "100", "--n-eval-copies", "20", "--n-eval", "100", "--seed", "0"],
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    return json.loads(made.stdout.strip().splitlines()[-1]) | {"weights": export_random_backbone(root / "w.pth", seed=1)}


@pytest.fixture(scope="module")
def one_process(generated, tmp_path_factory) -> tuple[str, list[dict]]:
    out = str(tmp_path_factory.mktemp("one") / "curation")
    argv = [sys.executable, "-m", "dinoforge.cli", "curate", "run", generated["pool"], "--weights", generated["weights"],
            "--out", out, "--eval-manifest", generated["eval"], "--seeds", generated["eval"], "--n", "150",
            "--levels", "16", "4", "--resampling-steps", "3", "--chunk-rows", "128"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, [json.loads(line) for line in result.stdout.strip().splitlines()]


def test_planted_copies_found_from_stored_signatures(generated, one_process):
    """>= 95 % of planted copies removed with >= 95 % precision, every planted copy of an
    evaluation image removed; each removal names the row it duplicates."""
    out, summaries = one_process
    spec = PoolSpec.read(Path(generated["truth"]).parent)
    pool = Manifest.read(generated["pool"])
    # pool manifest rows are the generated files in order (import sorts by name)
    assert [uri.rsplit("/", 1)[-1] for uri in pool.table.column("uri").to_pylist()] == [f.rsplit("/", 1)[-1] for f in spec.files]
    ids, stored = load_signatures(out)  # computed by embed where it decoded each image
    fresh = Signatures.of(load_images(spec.paths()[:60]))
    assert np.array_equal(ids[:60], np.arange(60))
    assert np.array_equal(stored.hashes[:60], fresh.hashes) and torch.equal(stored.canon[:60], fresh.canon)
    assert np.array_equal(stored.pixels[:60], fresh.pixels)
    dedup = read_dedup(out)
    near = {item["row"] for item in dedup["removed"] if item["step"] in ("hash", "near")}
    found, planted, wrong = planted_scores(spec, near)
    recall, precision = found / planted, (len(near) - wrong) / len(near)
    removed = {item["row"] for item in dedup["removed"]}
    eval_gone = sum(copy in removed for copy in spec.eval_copy_of)
    eval_matched = sum(any(item["row"] == copy and item["duplicate_of"] == e for item in dedup["removed"])
                       for copy, e in spec.eval_copy_of.items())
    print(f"\ndedup counts {dedup['counts']}; near-duplicates recall {recall:.3f} ({found}/{planted}), "
          f"precision {precision:.3f}; evaluation copies removed {eval_gone}/{len(spec.eval_copy_of)} "
          f"({eval_matched} matched to their evaluation image)")
    assert recall >= 0.95 and precision >= 0.95
    assert eval_gone == len(spec.eval_copy_of)
    for item in dedup["removed"]:
        if item["step"] in ("hash", "near"):
            assert item["duplicate_of"] not in near  # points at the image its component kept
    counts = dedup["counts"]
    assert counts["pool"] == len(spec.files) and counts["skipped"] == 0
    assert counts["kept"] == counts["pool"] - len(removed)
    step = next(s for s in summaries if s["step"] == "dedup")
    assert step["kept"] == counts["kept"]


def test_three_workers_equal_one_process(generated, one_process, tmp_path, capsys):
    """The separate steps with embedding sharded over 3 torchrun workers write the same
    dedup.json, curated manifest and retrieved manifest as ``curate run``."""
    one, summaries = one_process
    three = str(tmp_path / "three")
    for manifest, where in ((generated["pool"], three), (generated["eval"], f"{three}/eval"), (generated["eval"], f"{three}/seeds")):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "dinoforge.cli",
                   "curate", "embed", manifest, "--weights", generated["weights"], "--out", where, "--chunk-rows", "128"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    steps = [["curate", "dedup", three, "--eval", f"{three}/eval"],
             ["curate", "cluster", three, "--levels", "16", "4", "--resampling-steps", "3"],
             ["curate", "sample", three, "--n", "150", "--manifest-out", f"{three}/curated.parquet"],
             ["curate", "retrieve", three, "--seeds", f"{three}/seeds", "--manifest-out", f"{three}/retrieved.parquet"]]
    results = {}
    for argv in steps:
        assert main(argv) == 0
        results[argv[1]] = last_json(capsys)[-1]
    by_step = {s["step"]: s for s in summaries}
    assert read_dedup(three)["removed"] == read_dedup(one)["removed"]
    assert results["sample"]["digest"] == by_step["sample"]["digest"]
    assert results["retrieve"]["digest"] == by_step["retrieve"]["digest"]

    curated, pool = Manifest.read(f"{one}/curated.parquet"), Manifest.read(generated["pool"])
    removed = {item["row"] for item in read_dedup(one)["removed"]}
    rows = [pool.table.column("uri").to_pylist().index(u) for u in curated.table.column("uri").to_pylist()]
    assert len(set(rows)) == 150 and not set(rows) & removed  # sampled from the de-duplicated pool only
    meta = curated.metadata
    assert meta["parents"] == [{"uri": "file://" + generated["pool"], "digest": pool.digest}]
    assert meta["curation"]["dedup"]["counts"] == read_dedup(one)["counts"]
    assert meta["curation"]["sample"]["cluster"]["levels"] == [16, 4] and meta["curation"]["sample"]["cluster"]["deduplicated"]
    ids, hierarchy, _ = read_clusters(one)
    assert len(ids) == read_dedup(one)["counts"]["kept"]
    top = hierarchy.point_clusters()[:, -1]
    assert cluster_entropy(top[np.isin(ids, rows)], 4) > cluster_entropy(top, 4)  # flatter than the pool

    retrieved = Manifest.read(f"{one}/retrieved.parquet")
    assert retrieved.metadata["parents"][1]["digest"] == Manifest.read(generated["eval"]).digest
    assert by_step["retrieve"]["k"] == 4 and 4 <= len(retrieved) <= 400
    retrieved_rows = {pool.table.column("uri").to_pylist().index(u) for u in retrieved.table.column("uri").to_pylist()}
    assert not retrieved_rows & removed
    assert {"cluster_sizes.png", "clusters_montage.png", "near_duplicates.png"} <= set(
        name.rsplit("/", 1)[-1] for name in by_step["report"]["files"])


def test_retrieve_by_seed_clusters_and_ivfpq(generated, one_process, tmp_path, capsys):
    """``clusters``: exactly the de-duplicated pool images of the bottom clusters whose centroid
    is nearest to some seed (computed here independently); ``ivfpq``: its recall@4 against exact
    search is reported and matches the overlap with the exact retrieval."""
    out, _ = one_process
    assert main(["curate", "retrieve", out, "--seeds", f"{out}/seeds", "--method", "clusters",
                 "--manifest-out", str(tmp_path / "clusters.parquet")]) == 0
    by_clusters = last_json(capsys)[-1]
    ids, hierarchy, _ = read_clusters(out)
    seeds = load_embeddings(f"{out}/seeds")[1].astype(np.float64)
    centroids = hierarchy.levels[0].centroids.astype(np.float64)
    nearest = ((seeds[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    expected = np.sort(ids[np.isin(hierarchy.point_clusters()[:, 0], nearest)])
    pool_uris = Manifest.read(generated["pool"]).table.column("uri").to_pylist()
    got = sorted(pool_uris.index(u) for u in Manifest.read(str(tmp_path / "clusters.parquet")).table.column("uri").to_pylist())
    assert got == expected.tolist() and by_clusters["images"] == len(expected)

    assert main(["curate", "retrieve", out, "--seeds", f"{out}/seeds", "--method", "ivfpq", "--nprobe", "4",
                 "--manifest-out", str(tmp_path / "ivfpq.parquet")]) == 0
    by_ivfpq = last_json(capsys)[-1]
    print(f"\nretrieval: clusters {by_clusters['images']} images; ivfpq {by_ivfpq['images']} images, nlist {by_ivfpq['nlist']}, "
          f"recall@4 {by_ivfpq['recall_at_k']} over {by_ivfpq['recall_queries']} seeds")
    assert by_ivfpq["recall_queries"] == 100 and 0.5 <= by_ivfpq["recall_at_k"] <= 1.0
    exact = set(Manifest.read(f"{out}/retrieved.parquet").table.column("uri").to_pylist())
    approx = set(Manifest.read(str(tmp_path / "ivfpq.parquet")).table.column("uri").to_pylist())
    assert len(exact & approx) >= 0.5 * len(exact)
