"""The deterministic, sharded, endless multi-crop stream that pretraining reads.

The stream is a pure function of (seed, position): global position ``p`` is element
``p mod N`` of epoch ``p // N``'s permutation (drawn from (seed, epoch)), and each sample's
augmentation is drawn from a generator seeded with (seed, epoch, index). A global batch is
``world_size * batch_size`` consecutive positions, of which rank ``r`` takes the ``r``-th
slice. So the stream does not depend on the number of loader workers, and a loader built
at a checkpoint's position continues it exactly.

An image that cannot be used (:class:`BadImage`) is replaced in its slot by a substitute
drawn from (seed, epoch, index): every other slot keeps its image and its randomness, the
batch keeps its size, and the skip is reported with the batch (uri and reason).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dinoforge.data.decode import BadImage
from dinoforge.data.sources import ImageSource
from dinoforge.data.augment import MultiCropAugmentation

log = logging.getLogger("dinoforge.data")

# Distinct "index" arguments of sample_seed for the non-sample random streams of an epoch/step.
PERMUTATION_STREAM, MASK_STREAM, SUBSTITUTE_STREAM, RANK_STREAM = -1, -2, -3, -4


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample (SplitMix64 finaliser over the triple)."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


class StreamBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless per-rank batches of (epoch, index), starting at global ``start_position``."""

    def __init__(
        self, dataset_size: int, batch_size: int, seed: int, start_position: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if dataset_size <= 0:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.start_position, self.rank, self.world_size = start_position, rank, world_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, PERMUTATION_STREAM))
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        global_batch = self.batch_size * self.world_size
        position = self.start_position
        epoch, order = -1, None
        while True:
            batch = []
            for p in range(position + self.rank * self.batch_size, position + (self.rank + 1) * self.batch_size):
                e, offset = divmod(p, self.dataset_size)
                if e != epoch:
                    epoch, order = e, self._permutation(e)
                batch.append((e, int(order[offset])))
            yield batch
            position += global_batch


@dataclass
class SkipLedger:
    """Which images were skipped and why, over a whole run (kept in checkpoints):
    ``files`` maps each distinct bad index to its reason; ``events`` counts every skip."""

    files: dict[int, str] = field(default_factory=dict)
    events: int = 0

    def record(self, skipped: list[dict]) -> None:
        for item in skipped:
            self.events += 1
            self.files.setdefault(item["index"], item["reason"])

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(self.files.values()).items()))

    def state_dict(self) -> dict:
        return {"files": {str(k): v for k, v in self.files.items()}, "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.files = {int(k): v for k, v in state["files"].items()}
        self.events = state["events"]


class MultiCropDataset(Dataset):
    """Keys are (epoch, index); batches are fetched whole (``__getitems__``) so the reads
    of a batch overlap."""

    def __init__(self, source: ImageSource, augmentation: MultiCropAugmentation, seed: int, max_substitutes: int = 16) -> None:
        self.source, self.augmentation, self.seed, self.max_substitutes = source, augmentation, seed, max_substitutes

    def __len__(self) -> int:
        return len(self.source)

    def _substitutes(self, epoch: int, index: int) -> list[int]:
        generator = torch.Generator().manual_seed(sample_seed(sample_seed(self.seed, epoch, index), 0, SUBSTITUTE_STREAM))
        return torch.randint(len(self.source), (self.max_substitutes,), generator=generator).tolist()

    def _fill(self, epoch: int, index: int, skipped: list[dict]) -> torch.Tensor:
        """A usable image for the slot of (epoch, index) whose own image is bad."""
        for candidate in self._substitutes(epoch, index):
            (result,) = self.source.get_many([candidate])
            if not isinstance(result, BadImage):
                return result[0]
            skipped.append(self._skip(candidate, result))
        raise RuntimeError(
            f"{self.max_substitutes + 1} unusable images in a row while filling the slot of image {index} "
            f"(epoch {epoch}); last: {skipped[-1]}. Check the dataset."
        )

    def _skip(self, index: int, bad: BadImage) -> dict:
        uri = self.source.uri(index)
        log.warning("skipped %s: %s (%s)", uri, bad.reason, bad.detail)
        return {"index": index, "uri": uri, "reason": bad.reason, "detail": bad.detail}

    def __getitems__(self, keys: list[tuple[int, int]]) -> tuple[list[dict], list[dict]]:
        """(augmented samples, skipped images); the DataLoader hands both to the collate."""
        results = self.source.get_many([index for _, index in keys])
        samples, skipped = [], []
        for (epoch, index), result in zip(keys, results):
            if isinstance(result, BadImage):
                skipped.append(self._skip(index, result))
                image = self._fill(epoch, index, skipped)
            else:
                image = result[0]
            # The slot's randomness, whichever image fills it.
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            samples.append(self.augmentation(image, generator))
        return samples, skipped


def collate_multicrop(fetched: tuple[list[dict], list[dict]]) -> dict:
    """Stacks crops crop-major: (n_crops * B, 3, S, S), all images' crop 0 first; ``skipped``
    lists the images replaced in this batch."""
    samples, skipped = fetched
    n_global, n_local = len(samples[0]["global_crops"]), len(samples[0]["local_crops"])
    batch = {"global_crops": torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])}
    if n_local:
        batch["local_crops"] = torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
    batch["skipped"] = skipped
    return batch


def multicrop_loader(
    source: ImageSource,
    augmentation: MultiCropAugmentation,
    batch_size: int,
    seed: int,
    start_position: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    return DataLoader(
        MultiCropDataset(source, augmentation, seed),
        batch_sampler=StreamBatchSampler(len(source), batch_size, seed, start_position, rank, world_size),
        collate_fn=collate_multicrop,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
        # Its own generator: creating the iterator must not draw from the global RNG, whose
        # state (stochastic depth) is checkpointed.
        generator=torch.Generator().manual_seed(seed),
    )
