"""The DINOv2 objective shared by pretraining and distillation: its config, the heads it
trains, and the weighted loss over one step's tokens.

Loss = DINO (image level, on CLS) + iBOT (masked patches) + 0.1 * KoLeo (on the student's
global CLS features), with separate DINO and iBOT heads (paper §4).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from dinoforge.model.heads import DINOHead
from dinoforge.model.losses import dino_loss, dino_loss_fused, ibot_loss, ibot_loss_fused, koleo_loss

CENTERINGS = ("sinkhorn_knopp", "softmax")


@dataclass(frozen=True)
class HeadConfig:
    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3


@dataclass(frozen=True)
class ObjectiveConfig:
    """Defaults are the official ``ssl_default_config.yaml`` values."""

    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)
    separate_ibot_head: bool = True
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    student_temperature: float = 0.1
    centering: str = "sinkhorn_knopp"
    sinkhorn_iterations: int = 3
    center_momentum: float = 0.9
    mask_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)

    def __post_init__(self) -> None:
        if self.centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {self.centering!r}")
        if self.sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {self.sinkhorn_iterations}")
        low, high = self.mask_ratio_min_max
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {self.mask_ratio_min_max}")
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ValueError(f"mask_probability must be in [0, 1], got {self.mask_probability}")


def build_heads(embed_dim: int, cfg: ObjectiveConfig) -> tuple[DINOHead, DINOHead]:
    """The DINO and iBOT heads on ``embed_dim`` features (one shared head unless
    ``separate_ibot_head``)."""

    def make(head: HeadConfig) -> DINOHead:
        return DINOHead(embed_dim, head.n_prototypes, head.hidden_dim, head.bottleneck_dim, head.nlayers)

    dino = make(cfg.dino_head)
    return dino, (make(cfg.ibot_head) if cfg.separate_ibot_head else dino)


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` under torch.compile, once per process, with dynamic shapes: the number of masked
    patches (rows of the iBOT logits and targets) changes every step."""
    return torch.compile(fn, dynamic=True)


def masked_rows(masks: Tensor) -> Tensor:
    """Flat indices of the masked patches, (M,) in row-major order: the rows of the iBOT
    logits and targets."""
    return masks.flatten().nonzero().squeeze(1)


def objective(
    cfg: ObjectiveConfig,
    heads: tuple[DINOHead, DINOHead],
    cls_tokens: Tensor,
    dino_targets: Tensor,
    patch_tokens: Tensor,
    ibot_targets: Tensor,
    masks: Tensor,
    global_cls: Tensor,
    n_global: int = 2,
    fused: bool = False,
    compile: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DINO over every student crop's CLS token (crop-major, S*B rows) through the student's
    DINO head against the teacher's global targets (n_global*B rows) + iBOT over the masked
    patch tokens (M rows) through the iBOT head + KoLeo on each global crop's student CLS.
    ``fused`` computes each head's prototype layer inside its loss, in chunks, so the (rows, K)
    logits are never stored (``losses.prototype_cross_entropy``); the value is the same.
    ``compile`` runs the unfused iBOT loss compiled: its log-softmax and products over the
    (M, K) matrix become a few fused passes. Returns the weighted total and the detached parts."""
    dino_head, ibot_head = heads
    batch = dino_targets.shape[0] // n_global
    k = dino_targets.shape[-1]
    targets = dino_targets.view(n_global, batch, k)
    tau = cfg.student_temperature
    if fused:
        features = dino_head.features(cls_tokens)
        prototypes = dino_head.last_layer.prototypes()
        dino = dino_loss_fused(features.view(-1, batch, features.shape[-1]), prototypes, targets, tau)
        ibot = ibot_loss_fused(
            ibot_head.features(patch_tokens), ibot_head.last_layer.prototypes(), ibot_targets, masks, tau
        )
    else:
        dino = dino_loss(dino_head(cls_tokens).view(-1, batch, k), targets, tau)
        ibot = (compiled(ibot_loss) if compile else ibot_loss)(ibot_head(patch_tokens), ibot_targets, masks, tau)
    koleo = sum(koleo_loss(chunk) for chunk in global_cls.chunk(n_global))
    parts = {"dino_loss": dino, "ibot_loss": ibot, "koleo_loss": koleo}
    total = (
        cfg.dino_loss_weight * parts["dino_loss"]
        + cfg.ibot_loss_weight * parts["ibot_loss"]
        + cfg.koleo_loss_weight * parts["koleo_loss"]
    )
    return total, {name: value.detach() for name, value in parts.items()}
