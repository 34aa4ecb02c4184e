"""AdamW with the parameter groups of the DINOv2 recipe (official ``get_params_groups``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from dinoforge.config import Config
    from dinoforge.model import MetaArch

_EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


@dataclass(frozen=True)
class GroupKey:
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


def _layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for everything after the blocks
    (final norm, heads): layer-wise lr decay multiplies lr by decay ** (depth + 1 - id)."""
    if not name.startswith("backbone."):
        return depth + 1
    part = name.split(".")[1]
    if part in _EMBEDDINGS:
        return 0
    if part == "blocks":
        return int(name.split(".")[2]) + 1
    return depth + 1


def param_groups(student: nn.ModuleDict, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """Groups the student's parameters by (lr multiplier, wd multiplier, last layer):
    no weight decay on biases, norms and LayerScale gammas; patch embedding lr x
    ``patch_embed_lr_mult``; the heads' prototype layers flagged so that their lr can be
    held at 0 during the first epoch (DINO's last-layer freeze)."""
    depth = len(student["backbone"].blocks)
    groups: dict[GroupKey, list[nn.Parameter]] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = layerwise_decay ** (depth + 1 - _layer_id(name, depth))
        if ".patch_embed." in f".{name}":
            lr_mult *= patch_embed_lr_mult
        no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
        key = GroupKey(lr_mult, 0.0 if no_decay else 1.0, "last_layer" in name)
        groups.setdefault(key, []).append(param)
    return [
        {
            "params": params,
            "lr_multiplier": k.lr_multiplier,
            "wd_multiplier": k.wd_multiplier,
            "is_last_layer": k.is_last_layer,
        }
        for k, params in groups.items()
    ]


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, last_layer_lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]


def build_optimizer(model: MetaArch, cfg: Config) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model.student, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult),
        betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
        fused=cfg.train.fused_optimizer or None,
    )
