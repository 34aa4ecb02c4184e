"""Exported backbones: weights in the official DINOv2 key format plus a JSON beside them
(``OUT.pth`` -> ``OUT.json``) that says how to rebuild the network and feed it images."""

from __future__ import annotations

import io
import json

import fsspec
import torch
import torch.distributed.checkpoint as dcp

from dinoforge.checkpoint import read_train_state, resolve_checkpoint
from dinoforge.config import Config
from dinoforge.model.distill import random_frozen_heads
from dinoforge.model.heads import DINOHead
from dinoforge.model.spec import BackboneSpec, official_spec
from dinoforge.model.ssl import _heads
from dinoforge.model.vit import DinoVisionTransformer


def _load_from_checkpoint(checkpoint_uri: str, modules: dict[str, torch.nn.Module]) -> None:
    """Fills each module from the tensors under its prefix in a (sharded) checkpoint, reading
    only those tensors, in one process."""
    state = {"model": {f"{prefix}.{k}": v for prefix, module in modules.items() for k, v in module.state_dict().items()}}
    dcp.load(state, checkpoint_id=checkpoint_uri, no_dist=True)
    for prefix, module in modules.items():
        module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in state["model"].items() if k.startswith(prefix + ".")})


def load_teacher(cfg: Config) -> tuple[DinoVisionTransformer, DINOHead, DINOHead]:
    """The frozen distillation teacher named by ``distill.teacher``: a pretraining run or
    checkpoint of ours (its EMA teacher backbone and heads), or backbone weights in the official
    key format (ours with the .json beside them, or an official release with
    ``distill.teacher_arch``), which come without heads: those get seeded random frozen heads."""
    uri, objective = cfg.distill.teacher, cfg.objective
    if not uri.endswith(".pth"):
        checkpoint = resolve_checkpoint(uri)
        teacher_cfg = read_train_state(checkpoint).run_config()
        backbone = teacher_cfg.model.backbone(teacher_cfg.crops.global_crops_size).build()
        dino_head, ibot_head = _heads(backbone.embed_dim, teacher_cfg.objective)
        heads = {"teacher.dino_head": dino_head} | ({"teacher.ibot_head": ibot_head} if ibot_head is not dino_head else {})
        _load_from_checkpoint(checkpoint, {"teacher.backbone": backbone, **heads})
    else:
        fs, _ = fsspec.core.url_to_fs(meta_uri(uri))
        if fs.exists(meta_uri(uri)):
            backbone, _ = load_backbone(uri)
        elif cfg.distill.teacher_arch:
            backbone = official_spec(cfg.distill.teacher_arch, cfg.distill.teacher_registers).build()
            with fsspec.open(uri, "rb") as handle:
                backbone.load_state_dict(torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True))
        else:
            raise ValueError(f"{uri} has no {meta_uri(uri)} beside it: set distill.teacher_arch (e.g. vit_large)")
        dino_head, ibot_head = random_frozen_heads(backbone.embed_dim, objective, cfg.distill.head_seed)
    for module in (backbone, dino_head, ibot_head):
        module.requires_grad_(False)
    return backbone.eval(), dino_head, ibot_head


def meta_uri(weights_uri: str) -> str:
    return (weights_uri[: -len(".pth")] if weights_uri.endswith(".pth") else weights_uri) + ".json"


def backbone_meta(cfg: Config) -> dict:
    """The JSON beside exported weights: the architecture (``BackboneSpec``) and how to feed it."""
    size = cfg.crops.global_crops_size
    return {
        "arch": cfg.model.arch,
        **cfg.model.backbone(size).to_meta(),
        "image_size": size,
        "resize_size": round(size / cfg.data.eval_crop_ratio),
        "mean": list(cfg.crops.mean),
        "std": list(cfg.crops.std),
        "grayscale": "repeat to 3 channels",
    }


def export_backbone(checkpoint_uri: str, weights_uri: str) -> dict:
    """Writes the backbone a run releases: the EMA teacher of a pretraining run, or the spare
    EMA of the student of a distillation run. Reads only that backbone's tensors."""
    state = read_train_state(checkpoint_uri)
    cfg = state.run_config()
    prefix = "ema.backbone" if cfg.distill.teacher else "teacher.backbone"
    meta = {**backbone_meta(cfg), "step": state.step, "checkpoint": checkpoint_uri, "exported": prefix}
    backbone = build_from_meta(meta)
    _load_from_checkpoint(checkpoint_uri, {prefix: backbone})
    _write(backbone, meta, weights_uri)
    return meta


def export_random(cfg: Config, weights_uri: str, seed: int, layerscale_init: float = 1.0) -> dict:
    """Writes a freshly initialised backbone of ``cfg``'s architecture in the export format:
    a stand-in embedder for curating before any model is trained. LayerScale 1 (not the
    training init of 1e-5) so that every block shapes the features."""
    meta = {**backbone_meta(cfg), "layerscale_init": layerscale_init, "step": 0, "exported": f"random_init(seed={seed})"}
    torch.manual_seed(seed)
    _write(build_from_meta(meta), meta, weights_uri)
    return meta


def _write(backbone: DinoVisionTransformer, meta: dict, weights_uri: str) -> None:
    buffer = io.BytesIO()
    torch.save(backbone.state_dict(), buffer)
    with fsspec.open(weights_uri, "wb") as handle:
        handle.write(buffer.getvalue())
    with fsspec.open(meta_uri(weights_uri), "w") as handle:
        json.dump(meta, handle, indent=2)


def build_from_meta(meta: dict) -> DinoVisionTransformer:
    return BackboneSpec.from_meta(meta).build()


def load_backbone(weights_uri: str, random_init: bool = False) -> tuple[DinoVisionTransformer, dict]:
    """Rebuilds an exported backbone (``random_init``: same architecture, fresh weights)."""
    with fsspec.open(meta_uri(weights_uri), "r") as handle:
        meta = json.load(handle)
    backbone = build_from_meta(meta)
    if not random_init:
        with fsspec.open(weights_uri, "rb") as handle:
            backbone.load_state_dict(torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True), strict=True)
    return backbone.eval(), meta
