"""DINOv2 models and objective: ``from dinoforge.model import build_backbone``."""

from dinoforge.model.vit import ARCHS, DinoVisionTransformer, build_backbone

__all__ = ["ARCHS", "DinoVisionTransformer", "build_backbone"]
