"""Image sources and the deterministic multi-crop stream for pretraining.

A *source* is anything with ``len()`` and ``get(index) -> (uint8 CxHxW tensor, label)``.
The training stream is a pure function of (seed, step): batch ``s`` holds positions
``s*B .. s*B+B-1`` of an endless sequence of per-epoch permutations, and each sample's
augmentation generator is seeded from (seed, epoch, index). So the stream does not depend
on the number of loader workers, and resuming at step ``s`` continues it exactly.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from dinoforge.model.augment import MultiCropAugmentation

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Mean/std of the Fashion-MNIST training images (pixels in [0, 1]), computed with
# `FashionMNIST(root, "train").images.float().div(255)` -> mean 0.2860, std 0.3530.
FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)


class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def get(self, index: int) -> tuple[torch.Tensor, int]: ...


def _read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (the MNIST format: magic, dims as big-endian int32, uint8 data)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMNIST:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (60k train / 10k test)."""

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
        self.images = torch.from_numpy(_read_idx(images).copy())  # (N, 28, 28) uint8
        self.labels = torch.from_numpy(_read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].unsqueeze(0), int(self.labels[index])


class ImageFolder:
    """Every image file under ``root`` (sorted); the label is the index of its first-level
    sub-folder (sorted names), or -1 for files directly in ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {self.root}")
        self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.files if p.parent != self.root})
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = [index[p.relative_to(self.root).parts[0]] if p.parent != self.root else -1 for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1), self.labels[index]


def open_source(spec: str, fashion_mnist_root: str | Path) -> ImageSource:
    """``fashion-mnist``, ``fashion-mnist:test`` or ``folder:PATH``."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        return FashionMNIST(fashion_mnist_root, arg or "train")
    if kind == "folder" and arg:
        return ImageFolder(arg)
    raise ValueError(f"unknown dataset {spec!r}: expected 'fashion-mnist[:train|test]' or 'folder:PATH'")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample (SplitMix64 finaliser over the triple)."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


class StreamBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of (epoch, index): epoch e visits the dataset in the permutation
    drawn from (seed, e). ``start_step`` skips the batches already trained on."""

    def __init__(self, dataset_size: int, batch_size: int, seed: int, start_step: int = 0) -> None:
        self.dataset_size, self.batch_size, self.seed, self.start_step = dataset_size, batch_size, seed, start_step

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1)))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start_step * self.batch_size
        epoch, offset = divmod(position, self.dataset_size)
        order = self._permutation(epoch)
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if offset == self.dataset_size:
                    epoch, offset = epoch + 1, 0
                    order = self._permutation(epoch)
                batch.append((epoch, int(order[offset])))
                offset += 1
            yield batch


class MultiCropDataset(Dataset):
    def __init__(self, source: ImageSource, augmentation: MultiCropAugmentation, seed: int) -> None:
        self.source, self.augmentation, self.seed = source, augmentation, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, list[torch.Tensor]]:
        epoch, index = key
        image, _ = self.source.get(index)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return self.augmentation(image, generator)


def collate_multicrop(samples: list[dict[str, list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Stacks crops crop-major: (n_crops * B, 3, S, S), all images' crop 0 first."""
    n_global, n_local = len(samples[0]["global_crops"]), len(samples[0]["local_crops"])
    batch = {"global_crops": torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])}
    if n_local:
        batch["local_crops"] = torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
    return batch


def multicrop_loader(
    source: ImageSource, augmentation: MultiCropAugmentation, batch_size: int, seed: int, start_step: int, num_workers: int
) -> DataLoader:
    return DataLoader(
        MultiCropDataset(source, augmentation, seed),
        batch_sampler=StreamBatchSampler(len(source), batch_size, seed, start_step),
        collate_fn=collate_multicrop,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
        # Its own generator: creating the iterator must not draw from the global RNG, whose
        # state (stochastic depth) is checkpointed.
        generator=torch.Generator().manual_seed(seed),
    )
