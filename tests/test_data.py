"""The data layer end to end: manifests (content-addressed), importers, packed shards, the
robust training stream (skips counted exactly, order of the others unchanged), worker-count
independence and exact resume of the loader position."""

import hashlib
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from image_zoo import write_image_zoo

from checkpoints import checkpoint_tensors
from tiny import TINY as TINY_BASE

from dinoforge.checkpoint import latest_checkpoint, read_train_state
from dinoforge.cli import main
from dinoforge.config import DataConfig, load_config
from dinoforge.data import decode_limits, open_source
from dinoforge.data.importers import import_fashion_mnist, import_images, pack
from dinoforge.data.manifest import Manifest, ManifestError, rows_digest
from dinoforge.data.sources import FashionMNIST, ManifestSource
from dinoforge.data.storage import BlobReader, BlobRef, BytesCache
from dinoforge.data.stream import multicrop_loader
from dinoforge.data.augment import MultiCropAugmentation, MultiCropSpec
from dinoforge.train import pretrain

HEADER_REASONS = {"empty", "not_image", "too_large", "too_small"}  # found by import's header check
SPEC = MultiCropSpec(global_crops_size=16, local_crops_size=8, local_crops_number=2)
TINY = TINY_BASE + ["optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0", "train.batch_size_per_gpu=4"]


def expected_counts(zoo: dict, reasons: set[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in zoo.values():
        if reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def relative(uri: str, root: Path) -> str:
    return Path(uri.removeprefix("file://")).relative_to(root).as_posix()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "images"
    return root, write_image_zoo(root)


@pytest.fixture(scope="module")
def damaged(zoo, tmp_path_factory):
    """A manifest of the zoo, after which one good file was deleted and one rewritten: it
    holds every bad kind that only shows when the bytes are read or fully decoded."""
    root, files = zoo
    copy = tmp_path_factory.mktemp("damaged") / "images"
    for rel in files:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes((root / rel).read_bytes())
    report = import_images(str(copy))
    (copy / "rgb.bmp").unlink()  # read_error
    (copy / "grey.png").write_bytes((copy / "rgba.png").read_bytes())  # hash_mismatch
    out = str(copy.parent / "manifest.parquet")
    report.manifest.write(out)
    expected = {**expected_counts(files, {"truncated", "corrupt"}), "hash_mismatch": 1, "read_error": 1}
    return out, dict(sorted(expected.items()))


# --------------------------------------------------------------------------- manifests


def rows(n: int) -> list[dict]:
    return [
        {"uri": f"s3://b/{i}.jpg", "size": 100 + i, "sha256": f"{i:064x}", "width": 10 + i % 7, "height": 20,
         "label": None if i % 5 == 0 else i % 3, "source": "pool" if i % 2 else None}
        for i in range(n)
    ]


def test_manifest_round_trip_and_digest_is_over_rows_only(tmp_path):
    manifest = Manifest.from_rows(rows(10), {"classes": ["a", "b", "c"], "creator": {"tool": "test"}})
    digest = manifest.write(str(tmp_path / "m.parquet"))
    back = Manifest.read(str(tmp_path / "m.parquet"))
    assert back.digest == digest and back.table.equals(manifest.table)
    assert back.metadata["classes"] == ["a", "b", "c"] and back.row(3)["label"] == 0 and back.row(5)["label"] is None
    assert Manifest.from_rows(rows(10), {"other": "metadata"}).digest == digest
    changed = rows(10)
    changed[4]["width"] += 1
    assert Manifest.from_rows(changed).digest != digest
    moved = rows(10)
    moved[2]["source"], moved[3]["source"] = moved[3]["source"], moved[2]["source"]  # a null moves
    assert Manifest.from_rows(moved).digest != digest


def test_digest_does_not_depend_on_chunking():
    table = Manifest.from_rows(rows(70_001)).table
    one = rows_digest(table.combine_chunks().to_batches())
    pieces = pa.Table.from_batches(table.slice(0, 12_345).to_batches() + table.slice(12_345).to_batches(max_chunksize=9_999))
    assert rows_digest(pieces.to_batches()) == one


def test_tampered_or_foreign_manifests_are_refused(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    Manifest.from_rows(rows(4)).write(str(path))
    table = pq.read_table(path)
    tampered = table.set_column(1, "size", pa.array([1, 2, 3, 4], pa.int64()))
    pq.write_table(tampered.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(ManifestError, match="rows hash to"):
        Manifest.read(str(path))
    assert len(Manifest.read(str(path), verify=False)) == 4
    pq.write_table(pa.table({"uri": ["x"]}), tmp_path / "foreign.parquet")
    with pytest.raises(ManifestError, match="not a dinoforge manifest"):
        Manifest.read(str(tmp_path / "foreign.parquet"))
    with pytest.raises(ManifestError, match="'sha256' has null"):
        Manifest.from_rows([{**rows(1)[0], "sha256": None}])
    with pytest.raises(ManifestError, match="'shard' and 'offset'"):
        Manifest.from_rows([{**rows(1)[0], "shard": "s3://b/shard-000000.tar"}])
    with pytest.raises(ManifestError, match="columns must be"):
        Manifest(pa.table({"uri": ["x"]}))


# --------------------------------------------------------------------------- import and pack


def test_import_skips_header_level_bad_files_exactly(zoo, tmp_path, capsys, caplog):
    root, files = zoo
    out = tmp_path / "m.parquet"
    with caplog.at_level("WARNING", logger="dinoforge.data"):
        assert main(["data", "import", str(root), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == expected_counts(files, HEADER_REASONS)
    assert summary["images"] == sum(reason not in HEADER_REASONS for reason in files.values())
    skipped = [json.loads(line) for line in (tmp_path / "m.parquet.skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(s["uri"]).name for s in skipped) == sorted(Path(r).name for r, why in files.items() if why in HEADER_REASONS)
    assert all(s["uri"].split("/")[-1] in caplog.text for s in skipped)  # each logged with its uri
    manifest = Manifest.read(str(out))
    assert manifest.digest == summary["digest"] and manifest.classes == ["cats", "dogs"]
    by_name = {relative(manifest.row(i)["uri"], root): manifest.row(i) for i in range(len(manifest))}
    assert by_name["cats/a.jpg"]["label"] == 0 and by_name["dogs/b.png"]["label"] == 1 and by_name["rgb.jpg"]["label"] is None
    assert (by_name["exif_rot6.jpg"]["width"], by_name["exif_rot6.jpg"]["height"]) == (48, 64)  # as displayed
    data = (root / "rgb.jpg").read_bytes()
    assert by_name["rgb.jpg"]["sha256"] == hashlib.sha256(data).hexdigest() and by_name["rgb.jpg"]["size"] == len(data)


def test_pack_writes_tar_shards_with_exact_offsets_and_lineage(zoo, tmp_path):
    root, _ = zoo
    original = import_images(str(root)).manifest
    original.write(str(tmp_path / "m.parquet"))
    report = pack(original, str(tmp_path / "shards"), str(tmp_path / "m.parquet"), shard_bytes=8_000)
    packed = report.manifest
    assert len(packed) == len(original) and report.skipped == []
    assert packed.metadata["parents"] == [{"digest": original.digest, "uri": str(tmp_path / "m.parquet")}]
    assert len(packed.metadata["shards"]) > 1
    members = {}
    for shard in packed.metadata["shards"]:
        with tarfile.open(shard.removeprefix("file://")) as tar:
            for member in tar.getmembers():
                members[(shard, member.name)] = member
    for i in range(len(packed)):
        row, before = packed.row(i), original.row(i)
        assert {k: row[k] for k in ("uri", "size", "sha256", "label")} == {k: before[k] for k in ("uri", "size", "sha256", "label")}
        name = next(n for (s, n), m in members.items() if s == row["shard"] and m.offset_data == row["offset"])
        assert name.startswith(f"{i:09d}.")
        if row["label"] is not None:
            assert (row["shard"], f"{i:09d}.cls") in members
        blob = BlobReader().read(BlobRef(row["shard"], row["offset"], row["size"]))
        assert blob == Path(row["uri"].removeprefix("file://")).read_bytes()
    again = pack(original, str(tmp_path / "again"), shard_bytes=8_000).manifest
    first = Path(packed.metadata["shards"][0].removeprefix("file://")).read_bytes()
    assert Path(again.metadata["shards"][0].removeprefix("file://")).read_bytes() == first  # reproducible shards


def test_fashion_mnist_import_matches_the_idx_files(tmp_path):
    report = import_fashion_mnist(DataConfig.fashion_mnist_root, "test", str(tmp_path / "shards"))
    manifest = report.manifest
    reference = FashionMNIST(DataConfig.fashion_mnist_root, "test")
    assert len(manifest) == 10_000 and manifest.classes == list(FashionMNIST.CLASSES)
    source = ManifestSource(manifest)
    picks = [0, 1, 4_999, 9_999]
    for index, (image, label) in zip(picks, source.get_many(picks)):
        expected, expected_label = reference.get(index)
        assert torch.equal(image, expected) and label == expected_label
    assert source.uri(9_999) == "fashion-mnist:test/9999"


# --------------------------------------------------------------------------- the stream


def batches(source, n: int, workers: int = 0, start: int = 0, batch_size: int = 4, rank: int = 0, world: int = 1, seed: int = 0):
    loader = multicrop_loader(source, MultiCropAugmentation(SPEC), batch_size, seed, start, workers, rank, world)
    out, iterator = [], iter(loader)
    for _ in range(n):
        out.append(next(iterator))
    return out


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["global_crops"], y["global_crops"]) and torch.equal(x["local_crops"], y["local_crops"])
        assert [s["index"] for s in x["skipped"]] == [s["index"] for s in y["skipped"]]


def damaged_source(damaged) -> ManifestSource:
    return open_source(f"manifest:{damaged[0]}", DataConfig())


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("workers", [2, 4])
def test_stream_is_the_same_with_any_worker_count(damaged, workers):
    source = damaged_source(damaged)
    reference = batches(source, 6)  # 24 samples over a 16-image manifest: crosses an epoch
    assert sum(len(b["skipped"]) for b in reference) >= 4
    assert_same(batches(source, 6, workers=workers), reference)


def test_ranks_split_each_global_batch(damaged):
    source = damaged_source(damaged)
    whole = batches(source, 3, batch_size=4)
    halves = [batches(source, 3, batch_size=2, rank=r, world=2) for r in (0, 1)]
    for step in range(3):
        for kind, n in (("global_crops", 2), ("local_crops", 2)):
            # crop-major layout: crop c of every image of the batch, then crop c + 1
            parts = [h[step][kind].view(n, 2, *h[step][kind].shape[1:]) for h in halves]
            assert torch.equal(torch.cat(parts, dim=1).flatten(0, 1), whole[step][kind])


def test_resumed_loader_continues_the_stream_exactly(damaged):
    source = damaged_source(damaged)
    reference = batches(source, 7)
    assert_same(batches(source, 4, start=3 * 4, workers=2), reference[3:])


def test_a_bad_image_changes_only_its_own_slot(zoo, tmp_path):
    root, files = zoo
    good = [rel for rel, reason in files.items() if reason is None]
    folder = tmp_path / "images"
    for rel in good:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes((root / rel).read_bytes())
    manifest = import_images(str(folder)).manifest
    a = batches(ManifestSource(manifest), 8)  # 32 positions: each image twice
    victim = manifest.row(5)["uri"].removeprefix("file://")
    Path(victim).write_bytes(Path(victim).read_bytes()[: Path(victim).stat().st_size // 2])  # truncated after the import
    b = batches(ManifestSource(manifest, verify_hash=False), 8)
    differing = 0
    for x, y in zip(a, b):
        assert x["skipped"] == [] and {(s["index"], s["reason"]) for s in y["skipped"]} <= {(5, "truncated")}
        slots = torch.stack([(x[k] != y[k]).flatten(1).any(1).view(-1, 4).any(0) for k in ("global_crops", "local_crops")]).any(0)
        differing += int(slots.sum())
        assert int(slots.sum()) == len(y["skipped"])  # exactly the replaced slots differ
    assert differing == 2  # image 5 appears once per epoch


def test_a_dataset_of_only_bad_images_fails_with_a_clear_error(zoo, tmp_path):
    root, files = zoo
    manifest = import_images(str(root)).manifest
    bad_rows = [i for i in range(len(manifest)) if files[relative(manifest.row(i)["uri"], root)] is not None]
    only_bad = Manifest(manifest.table.take(bad_rows))
    with pytest.raises(RuntimeError, match="unusable images in a row"):
        batches(ManifestSource(only_bad), 1)


def test_training_epoch_over_bad_files_counts_every_reason_exactly(damaged, tmp_path):
    uri, expected = damaged
    n = len(Manifest.read(uri))
    steps = -(-n // 4)  # one epoch: every image visited at least once
    cfg = load_config("smoke", TINY + [f"data.dataset=manifest:{uri}", "optim.epochs=1", f"optim.epoch_length={steps}",
                                       "train.checkpoint_period=2"])
    summary = pretrain(cfg, str(tmp_path / "run"), progress=False)
    assert summary["step"] == steps and summary["skipped_images"] == expected
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_images"] == expected and last["skip_events"] >= sum(expected.values())
    state = read_train_state(latest_checkpoint(str(tmp_path / "run")))
    assert state.position == steps * 4 and state.dataset == Manifest.read(uri).digest
    assert state.skipped.by_reason() == expected
    # Interrupted after 2 steps and resumed: same weights and the same exact counts.
    pretrain(cfg, str(tmp_path / "split"), max_steps=2, progress=False)
    resumed = pretrain(cfg, str(tmp_path / "split"), progress=False)
    assert resumed["start_step"] == 2 and resumed["skipped_images"] == expected
    straight = checkpoint_tensors(latest_checkpoint(str(tmp_path / "run")))["model"]
    other = checkpoint_tensors(latest_checkpoint(str(tmp_path / "split")))["model"]
    for key, value in straight.items():
        assert torch.equal(value, other[key]), key


def test_packed_and_unpacked_manifests_give_the_same_stream(damaged, tmp_path):
    unpacked = damaged_source(damaged)
    report = pack(unpacked.manifest, str(tmp_path / "shards"), shard_bytes=10_000)
    assert report.skipped_by_reason == {"hash_mismatch": 1, "read_error": 1}
    packed_rows = {report.manifest.row(i)["uri"] for i in range(len(report.manifest))}
    keep = [i for i in range(len(unpacked)) if unpacked.uri(i) in packed_rows]
    files_only = ManifestSource(Manifest(unpacked.manifest.table.take(keep)))
    assert_same(batches(ManifestSource(report.manifest), 5), batches(files_only, 5))


# --------------------------------------------------------------------------- reading


def test_bytes_cache_is_bounded_and_counts_hits():
    cache = BytesCache(100)
    refs = [BlobRef(f"x{i}") for i in range(4)]
    for ref in refs:
        cache.put(ref, b"a" * 40)
    assert cache.used == 80 and cache.get(refs[0]) is None and cache.get(refs[3]) == b"a" * 40  # oldest evicted
    cache.put(BlobRef("big"), b"b" * 101)
    assert cache.get(BlobRef("big")) is None and (cache.hits, cache.misses) == (1, 2)


def test_reader_reports_missing_objects_per_blob(tmp_path):
    (tmp_path / "a").write_bytes(b"0123456789")
    reader = BlobReader(cache_bytes=1 << 20, threads=4)
    got = reader.read_many([BlobRef(str(tmp_path / "a"), 2, 3), BlobRef(str(tmp_path / "missing")), BlobRef(str(tmp_path / "a"))])
    assert got[0] == b"234" and isinstance(got[1], FileNotFoundError) and got[2] == b"0123456789"
    reader.read(BlobRef(str(tmp_path / "a")))
    assert reader.cache.hits == 1


def test_decode_limits_follow_the_data_config():
    limits = decode_limits(DataConfig(max_image_pixels=1000, min_image_side=4, decode_short_side=0))
    assert (limits.max_pixels, limits.min_side, limits.draft_short_side) == (1000, 4, None)


# --------------------------------------------------------------------------- object storage


@pytest.mark.parametrize("store", ["s3_prefix", "gcs_prefix"])
def test_import_pack_and_stream_from_object_storage(store, request, zoo):
    """The same pool on a bucket: same skips, same rows, and (packed, read by 2 forked
    workers) the same crops as the local copy."""
    import fsspec

    prefix = request.getfixturevalue(store)
    root, files = zoo
    fs, _ = fsspec.core.url_to_fs(prefix)
    for rel in files:
        fs.pipe_file(f"{prefix}/pool/{rel}", (root / rel).read_bytes())
    report = import_images(f"{prefix}/pool")
    assert report.skipped_by_reason == expected_counts(files, HEADER_REASONS)
    local = import_images(str(root)).manifest
    remote = report.manifest
    assert remote.table.column("sha256").equals(local.table.column("sha256"))
    assert all(remote.row(i)["uri"].startswith(prefix.split("://")[0] + "://") for i in range(len(remote)))
    remote.write(f"{prefix}/m.parquet")
    packed = pack(Manifest.read(f"{prefix}/m.parquet"), f"{prefix}/shards", shard_bytes=10_000).manifest
    assert packed.metadata["shards"][0].startswith(prefix.split("://")[0] + "://")
    packed.write(f"{prefix}/p.parquet")
    source = open_source(f"manifest:{prefix}/p.parquet", DataConfig())
    assert_same(batches(source, 5, workers=2), batches(ManifestSource(local), 5))
