"""Where a training run stands: the trainer owns it, each checkpoint stores it as
``trainer.json`` (the checkpointer writes and reads it), and export reads a checkpoint's
config through it (``checkpoint.read_train_state``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dinoforge.config import Config, build, to_dict
from dinoforge.data.stream import SkipLedger


@dataclass
class TrainState:
    step: int
    position: int  # global position in the sample stream: images drawn by all ranks so far
    dataset: str  # the training data's digest (a manifest's, else the dataset spec)
    skipped: SkipLedger
    world_size: int
    batch_size_per_gpu: int
    config: dict[str, Any]  # the run's config as plain data (``to_dict``)

    @classmethod
    def start(cls, cfg: Config, world_size: int, dataset: str) -> TrainState:
        return cls(0, 0, dataset, SkipLedger(), world_size, cfg.train.batch_size_per_gpu, to_dict(cfg))

    def advance(self, images: int) -> None:
        """One step done: ``images`` more drawn from the stream by all ranks together."""
        self.step += 1
        self.position += images

    def continue_from(self, saved: TrainState) -> list[str]:
        """Takes over ``saved``'s step, stream position and skip ledger (this state keeps the
        current config, data set and world size); returns how the two differ, for the log."""
        self.step, self.position, self.skipped = saved.step, saved.position, saved.skipped
        changes = []
        changed = _changed_keys(saved.config, self.config)
        if changed:
            changes.append(f"resuming with a config that differs from the checkpoint's in: {', '.join(changed)}")
        if saved.dataset != self.dataset:
            changes.append(
                f"resuming on a different dataset ({self.dataset}, checkpoint: {saved.dataset}): "
                "the sample stream will not continue exactly"
            )
        if saved.world_size != self.world_size:
            before, after = (size * self.batch_size_per_gpu for size in (saved.world_size, self.world_size))
            ranks = f"resuming {saved.world_size}-rank checkpoint on {self.world_size} ranks"
            changes.append(f"{ranks}: global batch {before} -> {after}")
        return changes

    def run_config(self) -> Config:
        return build(Config, self.config)

    # -- trainer.json ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {"position": self.position, "dataset": self.dataset, "skipped": self.skipped.state_dict()}
        return {
            "step": self.step,
            "world_size": self.world_size,
            "batch_size_per_gpu": self.batch_size_per_gpu,
            "data": data,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainState:
        data = state["data"]
        skipped = SkipLedger()
        skipped.load_state_dict(data["skipped"])
        return cls(
            state["step"],
            data["position"],
            data["dataset"],
            skipped,
            state["world_size"],
            state["batch_size_per_gpu"],
            state["config"],
        )


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed
