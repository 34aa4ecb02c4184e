"""Exported backbones: weights in the official DINOv2 key format plus a JSON beside them
(``OUT.pth`` -> ``OUT.json``) that says how to rebuild the network and feed it images."""

from __future__ import annotations

import io
import json

import fsspec
import torch

from dinoforge.checkpoint import load_checkpoint
from dinoforge.config import Config, build
from dinoforge.model.vit import ARCHS, DinoVisionTransformer

TEACHER_PREFIX = "teacher.backbone."
# Keys of the JSON that are DinoVisionTransformer constructor arguments.
ARCH_KEYS = (
    "embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans", "num_register_tokens",
    "ffn_layer", "layerscale_init", "interpolate_offset", "interpolate_antialias",
)


def meta_uri(weights_uri: str) -> str:
    return (weights_uri[: -len(".pth")] if weights_uri.endswith(".pth") else weights_uri) + ".json"


def backbone_meta(cfg: Config) -> dict:
    spec = ARCHS[cfg.model.arch]
    size = cfg.crops.global_crops_size
    return {
        "arch": cfg.model.arch,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "patch_size": cfg.model.patch_size,
        "img_size": cfg.model.img_size or size,
        "in_chans": cfg.model.in_chans,
        "num_register_tokens": cfg.model.num_register_tokens,
        "ffn_layer": cfg.model.ffn_layer or spec.ffn_layer,
        "layerscale_init": cfg.model.layerscale_init,
        "interpolate_offset": cfg.model.interpolate_offset,
        "interpolate_antialias": cfg.model.interpolate_antialias,
        "image_size": size,
        "resize_size": round(size / cfg.data.eval_crop_ratio),
        "mean": list(cfg.crops.mean),
        "std": list(cfg.crops.std),
        "grayscale": "repeat to 3 channels",
    }


def export_teacher(checkpoint_uri: str, weights_uri: str) -> dict:
    """Writes the EMA teacher's backbone (the network DINOv2 evaluates and releases)."""
    state = load_checkpoint(checkpoint_uri)
    meta = {**backbone_meta(build(Config, state["config"])), "step": state["step"], "checkpoint": checkpoint_uri}
    weights = {k[len(TEACHER_PREFIX) :]: v for k, v in state["model"].items() if k.startswith(TEACHER_PREFIX)}
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    with fsspec.open(weights_uri, "wb") as handle:
        handle.write(buffer.getvalue())
    with fsspec.open(meta_uri(weights_uri), "w") as handle:
        json.dump(meta, handle, indent=2)
    return meta


def build_from_meta(meta: dict) -> DinoVisionTransformer:
    return DinoVisionTransformer(**{key: meta[key] for key in ARCH_KEYS})


def load_backbone(weights_uri: str, random_init: bool = False) -> tuple[DinoVisionTransformer, dict]:
    """Rebuilds an exported backbone (``random_init``: same architecture, fresh weights)."""
    with fsspec.open(meta_uri(weights_uri), "r") as handle:
        meta = json.load(handle)
    backbone = build_from_meta(meta)
    if not random_init:
        with fsspec.open(weights_uri, "rb") as handle:
            backbone.load_state_dict(torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True), strict=True)
    return backbone.eval(), meta
