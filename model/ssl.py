"""The DINOv2 self-supervised objective: student/teacher networks and one training step.

Paper §4: an EMA teacher sees the two global crops; the student sees the global crops
(half of them with iBOT block masks) and the local crops, packed through one forward.
Loss = DINO (image level, on CLS) + iBOT (masked patches) + 0.1 * KoLeo (on the student's
global CLS features), with separate DINO and iBOT heads.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dinoforge.model.heads import DINOHead
from dinoforge.model.losses import (SoftmaxCentering, dino_loss, dino_loss_fused, ibot_loss, ibot_loss_fused, koleo_loss,
                                   sinkhorn_knopp)
from dinoforge.model.vit import DinoVisionTransformer

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


def masked_rows(masks: Tensor) -> Tensor:
    """Flat indices of the masked patches, (M,) in row-major order: the rows of the iBOT
    logits and targets."""
    return masks.flatten().nonzero().squeeze(1)


def _heads(embed_dim: int, cfg: ObjectiveConfig) -> tuple[DINOHead, DINOHead]:
    def make(head: HeadConfig) -> DINOHead:
        return DINOHead(embed_dim, head.n_prototypes, head.hidden_dim, head.bottleneck_dim, head.nlayers)

    dino = make(cfg.dino_head)
    return dino, (make(cfg.ibot_head) if cfg.separate_ibot_head else dino)


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` under torch.compile, once per process, with dynamic shapes: the number of masked
    patches (rows of the iBOT logits and targets) changes every step."""
    return torch.compile(fn, dynamic=True)


def objective(cfg: ObjectiveConfig, heads: tuple[DINOHead, DINOHead], cls_tokens: Tensor, dino_targets: Tensor,
              patch_tokens: Tensor, ibot_targets: Tensor, masks: Tensor, global_cls: Tensor, n_global: int = 2,
              fused: bool = False, compile: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
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
        dino = dino_loss_fused(features.view(-1, batch, features.shape[-1]), dino_head.last_layer.prototypes(), targets, tau)
        ibot = ibot_loss_fused(ibot_head.features(patch_tokens), ibot_head.last_layer.prototypes(), ibot_targets, masks, tau)
    else:
        dino = dino_loss(dino_head(cls_tokens).view(-1, batch, k), targets, tau)
        ibot = (compiled(ibot_loss) if compile else ibot_loss)(ibot_head(patch_tokens), ibot_targets, masks, tau)
    parts = {"dino_loss": dino, "ibot_loss": ibot, "koleo_loss": sum(koleo_loss(chunk) for chunk in global_cls.chunk(n_global))}
    total = (
        cfg.dino_loss_weight * parts["dino_loss"]
        + cfg.ibot_loss_weight * parts["ibot_loss"]
        + cfg.koleo_loss_weight * parts["koleo_loss"]
    )
    return total, {name: value.detach() for name, value in parts.items()}


class SSLMetaArch(nn.Module):
    def __init__(self, make_backbone: Callable[[float], DinoVisionTransformer], drop_path_rate: float, cfg: ObjectiveConfig,
                 packed: bool = True) -> None:
        """``make_backbone(drop_path_rate)`` builds one backbone; the teacher gets no
        stochastic depth and starts as a copy of the student (official recipe).
        ``packed=False`` runs the student once per crop instead (the benchmark baseline)."""
        super().__init__()
        self.cfg = cfg
        self.packed = packed
        self.fused_loss = False  # set by the trainer (train.fused_loss)
        self.compile_losses = False  # set by the trainer (train.compile)
        backbone = make_backbone(drop_path_rate)
        dino_head, ibot_head = _heads(backbone.embed_dim, cfg)
        self.student = nn.ModuleDict({"backbone": backbone, "dino_head": dino_head, "ibot_head": ibot_head})
        teacher_backbone = make_backbone(0.0)
        teacher_backbone.load_state_dict(backbone.state_dict())
        teacher_dino = copy.deepcopy(dino_head)
        teacher_ibot = copy.deepcopy(ibot_head) if cfg.separate_ibot_head else teacher_dino
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, "dino_head": teacher_dino, "ibot_head": teacher_ibot})
        self.teacher.requires_grad_(False)
        if cfg.centering == "softmax":
            self.dino_center = SoftmaxCentering(cfg.dino_head.n_prototypes, cfg.center_momentum)
            self.ibot_center = SoftmaxCentering(cfg.ibot_head.n_prototypes, cfg.center_momentum)

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # the teacher never uses stochastic depth
        return self

    def _targets(self, logits: Tensor, temperature: float, center: str) -> Tensor:
        if self.cfg.centering == "sinkhorn_knopp":
            sinkhorn = compiled(sinkhorn_knopp) if self.compile_losses else sinkhorn_knopp
            return sinkhorn(logits, temperature, self.cfg.sinkhorn_iterations)
        centering: SoftmaxCentering = getattr(self, center)
        targets = centering.targets(logits, temperature)
        centering.update(logits)
        return targets

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, mask_rows: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """Centred teacher distributions for the global crops' CLS tokens (2B, K) and for
        the patch tokens at the student's masked positions (M, K)."""
        out = self.teacher["backbone"].forward_features(global_crops)
        cls_logits = self.teacher["dino_head"](out["x_norm_clstoken"])
        patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_rows]
        patch_logits = self.teacher["ibot_head"](patches)
        return self._targets(cls_logits, temperature, "dino_center"), self._targets(patch_logits, temperature, "ibot_center")

    def forward(self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor, teacher_temperature: float,
                mask_rows: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """global_crops (2B, 3, G, G) and local_crops (nL*B, 3, L, L) are crop-major
        (all images' crop 0, then crop 1, ...); masks (2B, patches) bool; ``mask_rows`` their
        ``masks.flatten().nonzero()``, best found where the masks were drawn (on the host):
        finding them on the GPU makes the host wait for the device at every step.
        Returns the total loss and its detached parts."""
        batch = global_crops.shape[0] // 2
        if mask_rows is None:
            mask_rows = masked_rows(masks)
        dino_targets, ibot_targets = self.teacher_targets(global_crops, mask_rows, teacher_temperature)

        crops = [global_crops] + ([local_crops] if local_crops is not None and len(local_crops) else [])
        outputs = self._student_features(crops, [masks] + [None] * (len(crops) - 1), batch)
        cls_tokens = torch.cat([out["x_norm_clstoken"] for out in outputs])
        patch_tokens = outputs[0]["x_norm_patchtokens"].flatten(0, 1)[mask_rows]
        heads = (self.student["dino_head"], self.student["ibot_head"])
        return objective(self.cfg, heads, cls_tokens, dino_targets, patch_tokens, ibot_targets, masks,
                         outputs[0]["x_norm_clstoken"], fused=self.fused_loss, compile=self.compile_losses)

    def _student_features(self, crops: list[Tensor], masks: list[Tensor | None], batch: int) -> list[dict]:
        backbone = self.student["backbone"]
        if self.packed:
            return backbone.forward_features(crops, masks)
        outputs = []
        for images, group_masks in zip(crops, masks):
            n_crops = len(images) // batch
            per_crop = [
                backbone.forward_features(x, m)
                for x, m in zip(images.chunk(n_crops), group_masks.chunk(n_crops) if group_masks is not None else [None] * n_crops)
            ]
            outputs.append({key: torch.cat([out[key] for out in per_crop]) for key in ("x_norm_clstoken", "x_norm_patchtokens")})
        return outputs

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student (DINO §3.1), as one fused lerp. Under
        FSDP student and teacher are sharded alike, so each rank updates its own shards."""
        torch._foreach_lerp_(_local(self.teacher.parameters()), _local(self.student.parameters()), 1.0 - momentum)


def _local(params) -> list[Tensor]:
    return [p.to_local() if isinstance(p, DTensor) else p for p in params]
