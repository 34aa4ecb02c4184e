"""Hyper-parameter schedules (learning rate, weight decay, teacher momentum and temperature).

Same values as the official dinov2 CosineScheduler, but evaluated in closed form per step instead
of materialising a total_iters-long array.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dinoforge.training.optim import apply_schedules

if TYPE_CHECKING:
    from dinoforge.config import Config


@dataclass(frozen=True)
class CosineSchedule:
    """[0, freeze_iters) -> 0.0; then warmup_iters linear steps from start_warmup_value to base_value
    (np.linspace: first step = start, last step = base exactly); then a cosine from base_value
    towards final_value over the remaining steps; step >= total_iters -> final_value."""

    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __post_init__(self) -> None:
        if self.warmup_iters < 0 or self.freeze_iters < 0:
            raise ValueError(f"warmup_iters ({self.warmup_iters}) and freeze_iters ({self.freeze_iters}) must be >= 0")
        if self.total_iters < self.warmup_iters + self.freeze_iters:
            raise ValueError(
                f"total_iters ({self.total_iters}) must be >= warmup_iters ({self.warmup_iters}) "
                f"+ freeze_iters ({self.freeze_iters})"
            )

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step >= self.total_iters:
            return float(self.final_value)
        if step < self.freeze_iters:
            return 0.0
        i = step - self.freeze_iters
        if i < self.warmup_iters:
            # np.linspace(start, base, W): W == 1 yields [start]; the last of W > 1 is base exactly.
            if i == self.warmup_iters - 1 and self.warmup_iters > 1:
                return float(self.base_value)
            fraction = i / (self.warmup_iters - 1) if self.warmup_iters > 1 else 0.0
            return float(self.start_warmup_value + (self.base_value - self.start_warmup_value) * fraction)
        i -= self.warmup_iters
        n = self.total_iters - self.warmup_iters - self.freeze_iters
        # Official: np.arange(n) with cos(pi * i / n), so the last step stops one short of final_value.
        return float(self.final_value + 0.5 * (self.base_value - self.final_value) * (1.0 + math.cos(math.pi * i / n)))


def sqrt_scaled_lr(base_lr: float, total_batch_size: int) -> float:
    """DINOv2's 'sqrt_wrt_1024' rule: lr = base_lr * sqrt(total_batch_size / 1024)."""
    if total_batch_size <= 0:
        raise ValueError(f"total_batch_size must be > 0, got {total_batch_size}")
    return base_lr * math.sqrt(total_batch_size / 1024)


@dataclass(frozen=True)
class Schedules:
    """Per-step values of the official recipe; an "epoch" is ``optim.epoch_length`` steps."""

    lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    freeze_last_layer_steps: int

    @classmethod
    def from_config(cls, cfg: Config, total_batch_size: int) -> Schedules:
        o, t, epoch = cfg.optim, cfg.teacher, cfg.optim.epoch_length
        total = cfg.total_steps
        lr = sqrt_scaled_lr(o.base_lr, total_batch_size) if o.scaling_rule == "sqrt_wrt_1024" else o.base_lr
        return cls(
            lr=CosineSchedule(lr, o.min_lr, total, warmup_iters=o.warmup_epochs * epoch),
            weight_decay=CosineSchedule(o.weight_decay, o.weight_decay_end, total),
            momentum=CosineSchedule(t.momentum_teacher, t.final_momentum_teacher, total)
            if cfg.distill.ema_momentum is None or cfg.stage != "distill"
            else CosineSchedule(cfg.distill.ema_momentum, cfg.distill.ema_momentum, total),  # the spare EMA's
            teacher_temp=CosineSchedule(
                t.teacher_temp,
                t.teacher_temp,
                total,
                warmup_iters=min(t.warmup_teacher_temp_epochs * epoch, total),
                start_warmup_value=t.warmup_teacher_temp,
            ),
            freeze_last_layer_steps=o.freeze_last_layer_epochs * epoch,
        )

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        """Sets the step's learning rate and weight decay on ``optimizer``'s groups; returns the
        step's values under the names the metrics use."""
        values = {
            "lr": self.lr(step),
            "wd": self.weight_decay(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
        }
        apply_schedules(optimizer, values["lr"], self.last_layer_lr(step), values["wd"])
        return values

    def last_layer_lr(self, step: int) -> float:
        return 0.0 if step < self.freeze_last_layer_steps else self.lr(step)
