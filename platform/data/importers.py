"""Building manifests: import a folder or bucket prefix, import Fashion-MNIST, pack shards.

Packed shards are plain tar files (WebDataset layout: members ``<key>.<ext>`` and
``<key>.cls``) written deterministically (fixed mtime/owner), so any tar or WebDataset tool
can stream them. The manifest records each image's byte offset inside its shard, which turns
random access into one ranged read, so training keeps its exact per-epoch permutation
instead of the approximate shuffle buffer that sequential shard streaming needs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Iterator

import fsspec
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dinoforge.data.decode import BadImage, DecodeLimits, probe_image
from dinoforge.data.manifest import Manifest, creator_info
from dinoforge.data.sources import FashionMNIST, ManifestSource
from dinoforge.data.storage import BlobReader, BlobRef, join

log = logging.getLogger("dinoforge.data")

TAR_BLOCK = 512
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024  # large sequential objects; ranged reads keep random access
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class ImportReport:
    """What an import or pack kept and skipped (every skipped uri with its reason)."""

    manifest: Manifest | None = None  # set when the import or pack finishes
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"] for s in self.skipped).items()))

    def skip(self, uri: str, bad: BadImage) -> None:
        log.warning("skipped %s: %s (%s)", uri, bad.reason, bad.detail)
        self.skipped.append({"uri": uri, "reason": bad.reason, "detail": bad.detail})

    def write(self, uri: str) -> dict:
        """Writes the manifest to ``uri`` (and ``URI.skipped.jsonl``, one skipped image a line,
        when some were skipped); returns a summary."""
        digest = self.manifest.write(uri)
        if self.skipped:
            with fsspec.open(uri + ".skipped.jsonl", "w") as handle:
                handle.writelines(json.dumps(item) + "\n" for item in self.skipped)
        return {"manifest": uri, "digest": digest, "images": len(self.manifest), "skipped": self.skipped_by_reason,
                "classes": len(self.manifest.classes)}


def _progress(label: str, enabled: bool) -> Progress:
    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    return Progress(*columns, disable=not enabled)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def import_images(
    uri: str,
    source: str | None = None,
    labels_from_folders: bool = True,
    limits: DecodeLimits = DecodeLimits(),
    threads: int = 16,
    progress: bool = False,
) -> ImportReport:
    """Every file under ``uri`` (a local folder or a bucket prefix), in sorted order: read,
    hashed and its header checked; unreadable or unusable files are skipped and reported.
    With ``labels_from_folders`` the label is the index of the first-level sub-folder
    (sorted names); files directly under ``uri`` get no label."""
    fs, root = fsspec.core.url_to_fs(uri)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{uri} is not a folder or bucket prefix")
    root = root.rstrip("/")
    listing = fs.find(root, detail=True)
    paths = sorted(p for p, info in listing.items() if info.get("type", "file") == "file")
    relative = {p: PurePosixPath(p).relative_to(root).parts for p in paths}
    classes = sorted({parts[0] for parts in relative.values() if len(parts) > 1}) if labels_from_folders else []
    class_index = {name: i for i, name in enumerate(classes)}
    reader = BlobReader(threads=threads)
    source = source or fs.unstrip_protocol(root)
    rows: list[dict[str, Any]] = []
    report = ImportReport()
    with _progress("import", progress) as bar:
        task = bar.add_task("files", total=len(paths))
        for chunk in _chunks(paths, 256):
            refs = [BlobRef(fs.unstrip_protocol(p)) for p in chunk]
            for path, ref, data in zip(chunk, refs, reader.read_many(refs)):
                try:
                    if isinstance(data, Exception):
                        raise BadImage("read_error", f"{type(data).__name__}: {data}")
                    width, height, _ = probe_image(data, limits)
                except BadImage as bad:
                    report.skip(ref.uri, bad)
                    continue
                parts = relative[path]
                rows.append(
                    {
                        "uri": ref.uri,
                        "size": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "width": width,
                        "height": height,
                        "label": class_index[parts[0]] if len(parts) > 1 and labels_from_folders else None,
                        "source": source,
                    }
                )
            bar.advance(task, len(chunk))
    metadata = {
        "creator": creator_info(f"data import {uri}"),
        "parents": [],
        "classes": classes,
        "skipped": report.skipped_by_reason,
    }
    report.manifest = Manifest.from_rows(rows, metadata)
    return report


class ShardWriter:
    """Writes members into numbered tar shards ``<prefix>/shard-NNNNNN.tar`` of about
    ``shard_bytes`` each, returning where each image's bytes start."""

    def __init__(self, prefix: str, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(prefix)
        self.fs.makedirs(self.root, exist_ok=True)
        self.shard_bytes, self.index = shard_bytes, -1
        self._handle = self._tar = None
        self.position = 0
        self.shards: list[str] = []

    def _open_next(self) -> None:
        self.close()
        self.index += 1
        path = join(self.root, f"shard-{self.index:06d}.tar")
        self._handle = self.fs.open(path, "wb")
        # Stream mode: no seeks, so it writes straight into an object-store upload.
        self._tar = tarfile.open(fileobj=self._handle, mode="w|", format=tarfile.USTAR_FORMAT)
        self.position = 0
        self.shards.append(self.fs.unstrip_protocol(path))

    def _add_member(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self._tar.addfile(info, io.BytesIO(data))
        start = self.position + TAR_BLOCK  # a USTAR header is one block
        self.position = start + -(-len(data) // TAR_BLOCK) * TAR_BLOCK
        return start

    def add(self, key: str, extension: str, data: bytes, label: int | None) -> tuple[str, int]:
        """Adds ``<key>.<extension>`` (and ``<key>.cls`` with the label); returns (shard uri, data offset)."""
        if self._tar is None or self.position >= self.shard_bytes:
            self._open_next()
        offset = self._add_member(f"{key}.{extension}", data)
        if label is not None:
            self._add_member(f"{key}.cls", str(label).encode())
        return self.shards[-1], offset

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._handle.close()
            self._tar = self._handle = None


def _extension(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return EXTENSIONS.get(image.format or "", "img")
    except Exception:  # noqa: BLE001 - only picks a file-name extension
        return "img"


def pack(
    manifest: Manifest,
    shards_prefix: str,
    manifest_uri: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    threads: int = 16,
    progress: bool = False,
) -> ImportReport:
    """Copies every image of ``manifest`` into tar shards, in manifest order, and returns
    the packed manifest (same rows, plus shard/offset). Images that can no longer be read or
    whose bytes changed since the manifest was written are skipped and reported."""
    source = ManifestSource(manifest, io_threads=threads)  # verifies every image's SHA-256
    writer = ShardWriter(shards_prefix, shard_bytes)
    report = ImportReport()
    rows: list[dict[str, Any]] = []
    indices = list(range(len(manifest)))
    with _progress("pack", progress) as bar:
        task = bar.add_task("images", total=len(indices))
        for chunk in _chunks(indices, 256):
            for index, data in zip(chunk, source.read_many(chunk)):
                row = manifest.row(index)
                if isinstance(data, BadImage):
                    report.skip(row["uri"], data)
                    continue
                shard, offset = writer.add(f"{len(rows):09d}", _extension(data), data, row["label"])
                rows.append({**row, "shard": shard, "offset": offset})
            bar.advance(task, len(chunk))
    writer.close()
    parent = {"digest": manifest.digest, **({"uri": manifest_uri} if manifest_uri else {})}
    metadata = {
        **{k: v for k, v in manifest.metadata.items() if k not in ("creator", "parents", "skipped")},
        "creator": creator_info(f"data pack {manifest_uri or manifest.digest}"),
        "parents": [parent],
        "shards": writer.shards,
        "skipped": report.skipped_by_reason,
    }
    report.manifest = Manifest.from_rows(rows, metadata)
    return report


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def import_fashion_mnist(
    root: str, split: str, shards_prefix: str, shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False,
    limit: int | None = None,
) -> ImportReport:
    """Fashion-MNIST (its first ``limit`` images) as PNGs in tar shards (the idx files hold no
    per-image files), with uris ``fashion-mnist:<split>/<index>`` as identities."""
    dataset = FashionMNIST(root, split)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    writer = ShardWriter(shards_prefix, shard_bytes)
    rows = []
    with _progress("import", progress) as bar:
        task = bar.add_task("images", total=count)
        for index in range(count):
            data = _png(dataset.images[index].numpy())
            label = int(dataset.labels[index])
            shard, offset = writer.add(f"{index:09d}", "png", data, label)
            rows.append(
                {
                    "uri": dataset.uri(index),
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "width": 28,
                    "height": 28,
                    "label": label,
                    "source": f"fashion-mnist:{split}",
                    "shard": shard,
                    "offset": offset,
                }
            )
            bar.advance(task)
    writer.close()
    metadata = {
        "creator": creator_info(f"data import fashion-mnist:{split}" + (f" --limit {limit}" if limit is not None else "")),
        "parents": [],
        "classes": list(FashionMNIST.CLASSES),
        "shards": writer.shards,
        "skipped": {},
    }
    return ImportReport(Manifest.from_rows(rows, metadata))
