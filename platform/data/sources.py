"""Image sources: indexable collections of (uint8 C x H x W tensor, label).

A source has ``len()``, ``get_many(indices)`` returning, per index, either ``(image, label)``
or the :class:`BadImage` that explains why that image cannot be used, and ``uri(index)``
for logs. Labels are class indices, -1 when unknown.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from dinoforge.data.decode import BadImage, DecodeLimits, decode_image
from dinoforge.data.manifest import Manifest
from dinoforge.data.storage import BlobReader, BlobRef

Sample = tuple[torch.Tensor, int]

# Mean/std of the Fashion-MNIST training images (pixels in [0, 1]), computed with
# `FashionMNIST(root, "train").images.float().div(255)` -> mean 0.2860, std 0.3530.
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def get_many(self, indices: Sequence[int]) -> list[Sample | BadImage]: ...

    def uri(self, index: int) -> str: ...


def _read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (the MNIST format: magic, dims as big-endian int32, uint8 data)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMNIST:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (60k train / 10k test), in memory."""

    CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(self, root: str | Path, split: str = "train") -> None:
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        images = root / f"{prefix}-images-idx3-ubyte.gz"
        if not images.is_file():
            raise FileNotFoundError(
                f"{images} not found: install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
            )
        self.split = split
        self.images = torch.from_numpy(_read_idx(images).copy())  # (N, 28, 28) uint8
        self.labels = torch.from_numpy(_read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int) -> Sample:
        return self.images[index].unsqueeze(0), int(self.labels[index])

    def get_many(self, indices: Sequence[int]) -> list[Sample | BadImage]:
        return [self.get(i) for i in indices]

    def uri(self, index: int) -> str:
        return f"fashion-mnist:{self.split}/{index}"


class ManifestSource:
    """The images of a manifest, read through fsspec (concurrently per batch, through a
    bounded cache), checked against the recorded SHA-256 and decoded robustly."""

    def __init__(
        self,
        manifest: Manifest,
        limits: DecodeLimits = DecodeLimits(),
        verify_hash: bool = True,
        cache_bytes: int = 0,
        io_threads: int = 8,
    ) -> None:
        self.manifest, self.limits, self.verify_hash = manifest, limits, verify_hash
        self.reader = BlobReader(cache_bytes, io_threads)
        table = manifest.table
        self._uri, self._size, self._sha = table.column("uri"), table.column("size"), table.column("sha256")
        self._label, self._shard, self._offset = table.column("label"), table.column("shard"), table.column("offset")

    def __len__(self) -> int:
        return len(self.manifest)

    def uri(self, index: int) -> str:
        return self._uri[index].as_py()

    def ref(self, index: int) -> BlobRef:
        shard = self._shard[index].as_py()
        if shard is None:
            return BlobRef(self.uri(index))
        return BlobRef(shard, self._offset[index].as_py(), self._size[index].as_py())

    def _check(self, index: int, data: bytes | Exception) -> bytes | BadImage:
        if isinstance(data, Exception):
            return BadImage("read_error", f"{type(data).__name__}: {data}")
        if self.verify_hash and hashlib.sha256(data).hexdigest() != self._sha[index].as_py():
            return BadImage("hash_mismatch", f"content changed since the manifest was written ({len(data)} bytes read)")
        return data

    def read_many(self, indices: Sequence[int]) -> list[bytes | BadImage]:
        """The images' bytes, read concurrently and checked against the manifest (not decoded)."""
        blobs = self.reader.read_many([self.ref(i) for i in indices])
        return [self._check(i, data) for i, data in zip(indices, blobs)]

    def _decode(self, index: int, data: bytes | BadImage) -> Sample | BadImage:
        if isinstance(data, BadImage):
            return data
        try:
            image = decode_image(data, self.limits)
        except BadImage as bad:
            return bad
        label = self._label[index].as_py()
        return image, -1 if label is None else label

    def get_many(self, indices: Sequence[int]) -> list[Sample | BadImage]:
        return [self._decode(i, data) for i, data in zip(indices, self.read_many(indices))]
