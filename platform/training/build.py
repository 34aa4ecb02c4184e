"""What a run trains, built from its config: the meta-architecture of its stage (``Config.stage``)
and, for distillation, the frozen teacher it learns from."""

from __future__ import annotations

import io
from functools import partial

import fsspec
import torch

from dinoforge.checkpoint import load_modules, read_train_state, resolve_checkpoint
from dinoforge.config import Config
from dinoforge.export import load_backbone, meta_uri
from dinoforge.model import META_ARCHS, DistillMetaArch, MetaArch, SSLMetaArch
from dinoforge.model.distill import random_frozen_heads
from dinoforge.model.heads import DINOHead
from dinoforge.model.meta_arch import Levers
from dinoforge.model.objective import build_heads
from dinoforge.model.spec import official_spec
from dinoforge.model.vit import DinoVisionTransformer


def build_meta_arch(cfg: Config) -> MetaArch:
    """Self-supervised pretraining, or distillation when ``distill.teacher`` is set, computed
    with the ``train.*`` levers (fused loss, compiled blocks, activation checkpointing)."""
    spec = cfg.model.backbone(cfg.crops.global_crops_size)
    levers = Levers(cfg.train.fused_loss, cfg.train.compile, cfg.train.activation_checkpointing)
    if cfg.stage == "distill":
        teacher, dino_head, ibot_head = load_teacher(cfg)
        return DistillMetaArch(spec.build(drop_path_rate=0.0), teacher, dino_head, ibot_head, cfg.objective, levers)
    make = partial(spec.build, drop_path_uniform=cfg.model.drop_path_uniform)
    return SSLMetaArch(make, cfg.model.drop_path_rate, cfg.objective, levers)


def load_teacher(cfg: Config) -> tuple[DinoVisionTransformer, DINOHead, DINOHead]:
    """The frozen distillation teacher named by ``distill.teacher``: a run or checkpoint of
    ours (the backbone and heads of the branch that run releases), or backbone weights in the
    official key format (ours with the .json beside them, or an official release with
    ``distill.teacher_arch``), which come without heads: those get seeded random frozen heads."""
    uri = cfg.distill.teacher
    if not uri.endswith(".pth"):
        checkpoint = resolve_checkpoint(uri)
        teacher_cfg = read_train_state(checkpoint).run_config()
        backbone = teacher_cfg.model.backbone(teacher_cfg.crops.global_crops_size).build()
        dino_head, ibot_head = build_heads(backbone.embed_dim, teacher_cfg.objective)
        branch = META_ARCHS[teacher_cfg.stage].released_branch
        modules = {"backbone": backbone, "dino_head": dino_head} | (
            {"ibot_head": ibot_head} if ibot_head is not dino_head else {}
        )
        load_modules(checkpoint, {f"{branch}.{name}": module for name, module in modules.items()})
    else:
        if fsspec.core.url_to_fs(meta_uri(uri))[0].exists(meta_uri(uri)):
            backbone, _ = load_backbone(uri)
        elif cfg.distill.teacher_arch:
            backbone = official_spec(cfg.distill.teacher_arch, cfg.distill.teacher_registers).build()
            with fsspec.open(uri, "rb") as handle:
                backbone.load_state_dict(torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True))
        else:
            raise ValueError(f"{uri} has no {meta_uri(uri)} beside it: set distill.teacher_arch (e.g. vit_large)")
        dino_head, ibot_head = random_frozen_heads(backbone.embed_dim, cfg.objective, cfg.distill.head_seed)
    for module in (backbone, dino_head, ibot_head):
        module.requires_grad_(False)
    return backbone.eval(), dino_head, ibot_head
