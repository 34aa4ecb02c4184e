"""The curation report (issue 6) on a real pool (200 Fashion-MNIST images and one truncated PNG,
embedded, de-duplicated by hand, clustered and sampled): the counts are the ones the steps
wrote, the entropies equal ``cluster_entropy``, the pictures have the expected layout and the
same bytes when written again, and missing inputs are reported."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from dinoforge.config import DataConfig
from dinoforge.curation import report as report_module
from dinoforge.curation.cluster import cluster_entropy
from dinoforge.curation.embed import embed_manifest, embedding_info
from dinoforge.curation.report import write_report
from dinoforge.curation.steps import cluster_step, read_clusters, sample_step
from dinoforge.data.importers import import_images
from dinoforge.data.manifest import Manifest
from dinoforge.data.sources import FashionMNIST, ManifestSource
from test_curation_embed import export_random_backbone

N_IMAGES = 200
N_EVAL = 20
LEVELS = [12, 3]
N_CURATED = 60
# Hand-made removals (pool rows; eval rows for eval steps): 3 + 2 + 2 + 3 = 10 of the 200 usable rows.
REMOVED = ([("hash", 10 + 2 * i, 11 + 2 * i, None) for i in range(3)]
           + [("near", 20 + 2 * i, 21 + 2 * i, 0.9 - 0.01 * i) for i in range(2)]
           + [("eval_hash", 30 + i, i, None) for i in range(2)]
           + [("eval", 40 + i, 5 + i, 0.7 - 0.02 * i) for i in range(3)])
PNGS = ("cluster_sizes.png", "clusters_montage.png", "near_duplicates.png")


@dataclass
class Curation:
    out: Path
    pool_uri: str
    eval_uri: str
    curated_uri: str
    cut_row: int  # the truncated PNG's manifest row


def import_folder(folder: Path, images: np.ndarray, indices: list[int]) -> str:
    folder.mkdir(parents=True)
    for index in indices:
        Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def curation(tmp_path_factory) -> Curation:
    root = tmp_path_factory.mktemp("report")
    train = FashionMNIST(DataConfig().fashion_mnist_root, "train")
    # long-tailed class mix (class c keeps ~1/(c+1)), so bottom clusters differ in size
    keep = [i for i in range(5000) if i % (int(train.labels[i]) + 1) == 0][:N_IMAGES]
    images = Path(import_folder(root / "pool", train.images.numpy(), keep))
    whole = (images / f"{keep[0]:05d}.png").read_bytes()
    (images / f"{keep[0]:05d}_cut.png").write_bytes(whole[: len(whole) // 2])  # passes import, fails decoding
    pool = import_images(str(images)).manifest
    pool_uri = str(root / "pool.parquet")
    pool.write(pool_uri)
    cut_row = [Path(uri).stem for uri in pool.table.column("uri").to_pylist()].index(f"{keep[0]:05d}_cut")
    assert len(pool) == N_IMAGES + 1 and cut_row == 1

    test = FashionMNIST(DataConfig().fashion_mnist_root, "test")
    evaluation = import_images(import_folder(root / "eval", test.images.numpy(), list(range(N_EVAL)))).manifest
    eval_uri = str(root / "eval.parquet")
    evaluation.write(eval_uri)

    out = root / "out"
    weights = export_random_backbone(root / "w.pth", seed=3)
    embed_manifest(pool_uri, weights, str(out), rank=0, world=1, chunk_rows=64, batch_size=32, device="cpu")
    removed = [{"row": row, "step": step, "duplicate_of": of, "similarity": sim} for step, row, of, sim in REMOVED]
    counts = {"pool": N_IMAGES + 1, "skipped": 1, "hash": 3, "near": 2, "eval_hash": 2, "eval": 3,
              "kept": N_IMAGES - len(REMOVED)}
    dedup = {"format_version": 1, "method": "embedding", "params": {"k": 64, "threshold": 0.6},
             "pool": {"uri": pool_uri, "digest": pool.digest}, "eval": {"uri": eval_uri, "digest": evaluation.digest},
             "counts": counts, "removed": removed}
    (out / "dedup.json").write_text(json.dumps(dedup))
    cluster_step(str(out), LEVELS, resampling_steps=2)
    curated_uri = str(root / "curated.parquet")
    sample_step(str(out), N_CURATED, curated_uri)
    return Curation(out, pool_uri, eval_uri, curated_uri, cut_row)


def copy_of(curation: Curation, tmp_path: Path, *drop: str) -> Path:
    """The curation directory copied without its report and the files ``drop``."""
    copy = tmp_path / "out"
    shutil.copytree(curation.out, copy, ignore=shutil.ignore_patterns("report"))
    for name in drop:
        (copy / name).unlink()
    return copy


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and "Software" not in image.info  # no matplotlib version stamp
        return np.asarray(image.convert("RGB"))


def assert_bins(edges: list[float], *sizes: np.ndarray) -> None:
    """Equal bins on a log scale exactly when the non-empty sizes span more than 10x, else on a linear one."""
    positive = np.concatenate(sizes)
    positive = positive[positive > 0]
    assert edges[0] == positive.min() and edges[-1] == positive.max() + 1
    widths = np.diff(np.log(edges)) if positive.max() > 10 * positive.min() else np.diff(edges)
    assert np.allclose(widths, widths[0])


def test_counts_entropies_and_files(curation, tmp_path):
    out = copy_of(curation, tmp_path)
    result = write_report(str(out), curated=[curation.curated_uri])

    assert result["counts"] == {"pool": N_IMAGES + 1, "skipped": 1, "hash": 3, "near": 2, "eval_hash": 2, "eval": 3,
                                "kept": N_IMAGES - 10, "clustered": N_IMAGES - 10}  # cluster_step skips removals
    assert result["skipped_reasons"] == {"truncated": 1}
    pool_digest = Manifest.read(curation.pool_uri).digest
    assert result["pool"] == {"uri": embedding_info(str(out))["manifest_uri"], "digest": pool_digest}
    assert result["dedup"]["method"] == "embedding" and result["dedup"]["eval"]["uri"] == curation.eval_uri

    ids, hierarchy, params = read_clusters(str(out))
    assert not set(ids) & {curation.cut_row, *(row for _, row, _, _ in REMOVED)}
    assert result["clusters"]["params"] == params and params["deduplicated"]
    points, sizes = hierarchy.point_clusters(), hierarchy.cluster_sizes()
    levels = result["clusters"]["levels"]
    assert [level["clusters"] for level in levels] == LEVELS
    for i, level in enumerate(levels):
        assert level["points"] == N_IMAGES - 10 and level["empty"] == int((sizes[i] == 0).sum())
        assert level["entropy"] == pytest.approx(cluster_entropy(points[:, i], LEVELS[i]), abs=1e-12)
        assert level["max_entropy"] == pytest.approx(np.log(LEVELS[i]))
        assert sum(level["counts"]) == int((sizes[i] > 0).sum())  # every non-empty cluster is in a bin

    # the curated manifest's images, found independently by their pool row
    pool_uris = Manifest.read(curation.pool_uri).table.column("uri").to_pylist()
    rows = [pool_uris.index(uri) for uri in Manifest.read(curation.curated_uri).table.column("uri").to_pylist()]
    picked = np.searchsorted(ids, rows)
    [entry] = result["curated"]
    assert entry["images"] == N_CURATED and entry["digest"] == Manifest.read(curation.curated_uri).digest
    bottom_curated = cluster_entropy(points[picked, 0], LEVELS[0])
    top_curated = cluster_entropy(points[picked, 1], LEVELS[1])
    assert entry["entropy_nats"]["bottom"] == {"curated": pytest.approx(bottom_curated), "pool": levels[0]["entropy"]}
    assert entry["entropy_nats"]["top"] == {"curated": pytest.approx(top_curated), "pool": levels[1]["entropy"]}
    # balanced sampling flattens the long-tailed pool at both ends of the tree (checked on these numbers)
    assert bottom_curated > levels[0]["entropy"] and top_curated > levels[1]["entropy"]
    curated_sizes = np.bincount(points[picked, 0], minlength=LEVELS[0])
    assert_bins(levels[0]["bin_edges"], sizes[0], curated_sizes)  # one set of bins for pool and curated
    assert entry["bottom_sizes"]["bin_edges"] == levels[0]["bin_edges"]
    assert sum(entry["bottom_sizes"]["counts"]) == int((curated_sizes > 0).sum())

    report_dir = out / "report"
    assert result["files"] == [*PNGS, "report.md", "report.json"]
    assert sorted(p.name for p in report_dir.iterdir()) == sorted(result["files"])
    assert json.loads((report_dir / "report.json").read_text()) == result
    markdown = (report_dir / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in PNGS)
    assert "| kept after dedup | 190 |" in markdown and "truncated 1" in markdown


def test_pictures_layout_content_and_same_bytes_again(curation, tmp_path, monkeypatch):
    out = copy_of(curation, tmp_path)
    read = []  # (manifest digest, rows) of every image read

    class Spy(ManifestSource):
        def get_many(self, indices):
            read.append((self.manifest.digest, list(indices)))
            return super().get_many(indices)

    monkeypatch.setattr(report_module, "ManifestSource", Spy)
    options = {"curated": [curation.curated_uri], "montage_clusters": 4, "per_cluster": 5, "duplicate_examples": 6}
    first = write_report(str(out), **options)
    pictures = {name: (out / "report" / name).read_bytes() for name in PNGS}
    again = write_report(str(out), **options)
    assert again == first and {name: (out / "report" / name).read_bytes() for name in PNGS} == pictures

    arrays = {name: png(out / "report" / name) for name in PNGS}
    assert arrays["cluster_sizes.png"].shape == (400, 700, 3)
    for name in ("clusters_montage.png", "near_duplicates.png"):  # grey images in grey (and black text): R = G = B
        pixels = arrays[name]
        assert (pixels == pixels[..., :1]).all() and pixels.min() < 50 and pixels.max() == 255

    # montage: 4 distinct clusters spread over sizes, each with its members nearest the centroid first
    ids, hierarchy, _ = read_clusters(str(out))
    level, sizes = hierarchy.levels[0], hierarchy.cluster_sizes()[0]
    clusters = first["montage"]["clusters"]
    shown_sizes = [c["size"] for c in clusters]
    assert len({c["cluster"] for c in clusters}) == 4 and shown_sizes == sorted(shown_sizes, reverse=True)
    nonempty = np.sort(sizes[sizes > 0])  # one cluster from each quarter of the sizes
    assert shown_sizes[0] >= nonempty[len(nonempty) * 3 // 4] and shown_sizes[-1] <= nonempty[len(nonempty) // 4]
    for c in clusters:
        members = np.flatnonzero(level.parents == c["cluster"])
        positions = np.searchsorted(ids, c["rows"])
        assert c["size"] == sizes[c["cluster"]] and len(c["rows"]) == min(5, c["size"])
        assert set(positions) <= set(members) and np.all(np.diff(level.distances[positions]) >= 0)
        assert level.distances[positions].max() <= np.sort(level.distances[members])[len(positions) - 1]

    # near duplicates: every step shown, each pair's second image read from the manifest its step names
    examples = first["near_duplicates"]["examples"]
    assert len(examples) == 6 and {e["step"] for e in examples} == {"hash", "near", "eval_hash", "eval"}
    assert all(e in json.loads((out / "dedup.json").read_text())["removed"] for e in examples)
    pool_digest, eval_digest = Manifest.read(curation.pool_uri).digest, Manifest.read(curation.eval_uri).digest
    second_reads = [r for r in read[: len(read) // 2] if len(r[1]) == 1]
    assert second_reads == [(eval_digest if e["step"].startswith("eval") else pool_digest, [e["duplicate_of"]])
                            for e in examples]

    # layout: one montage row per cluster, one duplicate row per pair; the seed picks other clusters
    taller = write_report(str(out), montage_clusters=6, per_cluster=5, duplicate_examples=3)
    montage, duplicates = (png(out / "report" / name) for name in PNGS[1:])
    assert montage.shape[1] == arrays["clusters_montage.png"].shape[1]
    cell, pair, dpi = report_module.CELL, report_module.PAIR_ROW, report_module.DPI
    assert montage.shape[0] - arrays["clusters_montage.png"].shape[0] == pytest.approx(2 * cell * dpi)
    assert arrays["near_duplicates.png"].shape[0] - duplicates.shape[0] == pytest.approx(3 * pair * dpi)
    other_seed = write_report(str(out), montage_clusters=6, seed=1)
    assert taller["montage"]["clusters"] != other_seed["montage"]["clusters"]


def test_without_dedup_json_or_removals_there_are_no_duplicate_examples(curation, tmp_path):
    out = copy_of(curation, tmp_path, "dedup.json")
    cluster_step(str(out), LEVELS, resampling_steps=2)
    (out / "report").mkdir()
    (out / "report" / "near_duplicates.png").write_bytes(b"from an earlier report")
    result = write_report(str(out))
    assert result["counts"] == {"pool": N_IMAGES + 1, "skipped": 1, "clustered": N_IMAGES}  # no removals to skip
    assert result["dedup"] is None and result["curated"] == []
    assert result["near_duplicates"] == {"file": None, "reason": "no dedup.json in the curation directory"}
    assert not (out / "report" / "near_duplicates.png").exists()
    assert result["files"] == ["cluster_sizes.png", "clusters_montage.png", "report.md", "report.json"]
    assert sorted(p.name for p in (out / "report").iterdir()) == sorted(result["files"])
    assert "No near-duplicate examples: no dedup.json" in (out / "report" / "report.md").read_text()
    assert_bins(result["clusters"]["levels"][0]["bin_edges"], read_clusters(str(out))[1].cluster_sizes()[0])

    dedup = json.loads((curation.out / "dedup.json").read_text())
    counts = {"pool": N_IMAGES + 1, "skipped": 1, "hash": 0, "near": 0, "eval_hash": 0, "eval": 0, "kept": N_IMAGES}
    (out / "dedup.json").write_text(json.dumps({**dedup, "counts": counts, "removed": []}))
    result = write_report(str(out))
    assert result["counts"] == {**counts, "clustered": N_IMAGES}
    assert result["near_duplicates"] == {"file": None, "reason": "dedup.json lists no removals"}
    assert "near_duplicates.png" not in result["files"]


def test_report_on_s3_equals_local(curation, tmp_path, s3_prefix):
    """The curation directory on an object store: the same pictures as from a local directory."""
    local = copy_of(curation, tmp_path)
    fs, _ = fsspec.core.url_to_fs(s3_prefix)
    for path in local.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{s3_prefix}/{path.relative_to(local)}", path.read_bytes())
    remote = write_report(s3_prefix, curated=[curation.curated_uri], montage_clusters=2, duplicate_examples=2)
    result = write_report(str(local), curated=[curation.curated_uri], montage_clusters=2, duplicate_examples=2)
    assert {**remote, "out_uri": None} == {**result, "out_uri": None}
    for name in result["files"][:-1]:
        same = fs.cat_file(f"{s3_prefix}/report/{name}") == (local / "report" / name).read_bytes()
        assert same or name == "report.md"  # the markdown names its directory
    assert json.loads(fs.cat_file(f"{s3_prefix}/report/report.json")) == remote


def test_missing_clusters_is_a_clear_error(curation, tmp_path):
    out = copy_of(curation, tmp_path, "clusters.npz")
    with pytest.raises(FileNotFoundError, match=r"out/clusters\.npz not found: run the cluster step"):
        write_report(str(out))
    assert not (out / "report").exists()
