"""``platform/data/`` is imported as ``dinoforge.data``: everything between stored images and
the tensors a training step reads.

manifest.py   content-addressed Parquet manifests (uri, size, hash, label, shard offsets)
importers.py  folders / buckets / Fashion-MNIST -> manifests; packing into tar shards
storage.py    image bytes through fsspec (ranged reads of shards, a byte cache); URI joins
decode.py     robust decoding (size limits, reduced-scale JPEG decode, bad-image reasons)
sources.py    ImageSource: Fashion-MNIST in memory, or a manifest's images
augment.py    DINOv2 multi-crop augmentation on tensors (MultiCropSpec: the ``crops`` config)
masking.py    iBOT block masks, drawn per (seed, step, rank)
stream.py     the deterministic, sharded, resumable multi-crop stream (and its skip ledger)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dinoforge.data.decode import DecodeLimits
from dinoforge.data.importers import import_images
from dinoforge.data.manifest import Manifest
from dinoforge.data.sources import FashionMNIST, ImageSource, ManifestSource

if TYPE_CHECKING:
    from dinoforge.config import DataConfig


def decode_limits(cfg: DataConfig) -> DecodeLimits:
    return DecodeLimits(cfg.max_image_pixels, cfg.min_image_side, cfg.decode_short_side or None)


def source_digest(source: ImageSource, spec: str) -> str:
    """What identifies a training set in checkpoints and lineage: its manifest's digest, else
    the dataset spec (Fashion-MNIST)."""
    return source.manifest.digest if isinstance(source, ManifestSource) else spec


def open_source(spec: str, cfg: DataConfig) -> ImageSource:
    """``fashion-mnist[:train|test]``, ``manifest:URI`` or ``folder:URI`` (a folder or bucket
    prefix, imported in memory first: its header-level bad files are skipped then)."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        return FashionMNIST(cfg.fashion_mnist_root, arg or "train")
    if kind == "manifest" and arg:
        manifest = Manifest.read(arg)
    elif kind == "folder" and arg:
        manifest = import_images(arg, limits=decode_limits(cfg), threads=cfg.io_threads).manifest
    else:
        expected = "'fashion-mnist[:train|test]', 'manifest:URI' or 'folder:URI'"
        raise ValueError(f"unknown dataset {spec!r}: expected {expected}")
    if not len(manifest):
        raise ValueError(f"dataset {spec!r} has no usable images")
    return ManifestSource(manifest, decode_limits(cfg), cfg.verify_hash, cfg.cache_bytes, cfg.io_threads)
