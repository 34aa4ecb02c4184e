"""Exported backbones: weights in the official DINOv2 key format plus a JSON beside them
(``OUT.pth`` -> ``OUT.json``) that says how to rebuild the network and feed it images."""

from __future__ import annotations

import io
import json

import fsspec
import torch

from dinoforge.checkpoint import load_modules, read_train_state
from dinoforge.config import Config
from dinoforge.model import META_ARCHS
from dinoforge.model.spec import BackboneSpec
from dinoforge.model.vit import DinoVisionTransformer


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
    """Writes the backbone a run releases (its model's ``released_branch``: the EMA teacher of
    a pretraining run, the spare EMA of the student of a distillation run). Reads only that
    backbone's tensors."""
    state = read_train_state(checkpoint_uri)
    cfg = state.run_config()
    prefix = f"{META_ARCHS[cfg.stage].released_branch}.backbone"
    meta = {**backbone_meta(cfg), "step": state.step, "checkpoint": checkpoint_uri, "exported": prefix}
    backbone = build_from_meta(meta)
    load_modules(checkpoint_uri, {prefix: backbone})
    _write(backbone, meta, weights_uri)
    return meta


def export_random(cfg: Config, weights_uri: str, seed: int, layerscale_init: float = 1.0) -> dict:
    """Writes a freshly initialised backbone of ``cfg``'s architecture in the export format:
    a stand-in embedder for curating before any model is trained. LayerScale 1 (not the
    training init of 1e-5) so that every block shapes the features."""
    meta = {
        **backbone_meta(cfg),
        "layerscale_init": layerscale_init,
        "step": 0,
        "exported": f"random_init(seed={seed})",
    }
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
            backbone.load_state_dict(
                torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True), strict=True
            )
    return backbone.eval(), meta
