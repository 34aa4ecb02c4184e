"""The one description of a ViT backbone, from which everything else about it derives.

``ARCHS`` is the registry of named architectures, a frozen :class:`ArchSpec` each (width,
depth, heads, FFN). :class:`BackboneSpec` adds the settings that shape a
``DinoVisionTransformer``'s parameters and forward: ``build()`` makes the network, its fields
are the architecture keys of an exported backbone's JSON (``to_meta``/``from_meta``), and
``official_spec(arch)`` is the layout of DINOv2's released weights, whose keys then load with
``strict=True``. :class:`ModelConfig` is the ``model`` section of a run's config: it checks its
names against the registry and resolves to a ``BackboneSpec``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dinoforge.model.vit import DinoVisionTransformer

FFN_LAYERS = ("mlp", "swiglu", "swiglufused")  # swiglufused: the official configs' name for SwiGLU
# DINOv2's released backbones: patch 14, a 37 x 37 position grid (518 px).
OFFICIAL_PATCH_SIZE, OFFICIAL_IMG_SIZE = 14, 518


@dataclass(frozen=True)
class ArchSpec:
    embed_dim: int
    depth: int
    num_heads: int
    ffn_layer: str = "mlp"
    released: bool = True  # DINOv2 released weights of this size


# Official widths (paper Table 2 / dinov2 vision_transformer.py). vit_giant2 uses SwiGLU in
# every released checkpoint; the pico/nano/tiny sizes are ours, for CPU runs.
ARCHS: dict[str, ArchSpec] = {
    "vit_pico": ArchSpec(64, 4, 2, released=False),
    "vit_nano": ArchSpec(128, 4, 4, released=False),
    "vit_tiny": ArchSpec(192, 6, 3, released=False),
    "vit_small": ArchSpec(384, 12, 6),
    "vit_base": ArchSpec(768, 12, 12),
    "vit_large": ArchSpec(1024, 24, 16),
    "vit_giant2": ArchSpec(1536, 40, 24, ffn_layer="swiglu"),
}


def arch_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {sorted(ARCHS)}")
    return ARCHS[arch]


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that shapes a ``DinoVisionTransformer`` but the training-only stochastic
    depth. Defaults are the official releases' settings."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = OFFICIAL_PATCH_SIZE
    img_size: int = OFFICIAL_IMG_SIZE  # the learned position grid covers img_size / patch_size patches a side
    in_chans: int = 3
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"
    layerscale_init: float | None = 1e-5
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    @classmethod
    def named(cls, arch: str, ffn_layer: str | None = None, **settings) -> BackboneSpec:
        """A registered architecture; ``ffn_layer=None`` takes its default (SwiGLU for
        vit_giant2, MLP otherwise)."""
        spec = arch_spec(arch)
        return cls(spec.embed_dim, spec.depth, spec.num_heads, ffn_layer=ffn_layer or spec.ffn_layer, **settings)

    @classmethod
    def from_meta(cls, meta: dict) -> BackboneSpec:
        """The spec stored in an exported backbone's JSON (other keys are ignored)."""
        return cls(**{f.name: meta[f.name] for f in dataclasses.fields(cls)})

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    def build(self, drop_path_rate: float = 0.0, drop_path_uniform: bool = True) -> DinoVisionTransformer:
        return DinoVisionTransformer(
            **self.to_meta(), drop_path_rate=drop_path_rate, drop_path_uniform=drop_path_uniform
        )


def official_spec(arch: str, num_register_tokens: int = 0) -> BackboneSpec:
    """The layout of DINOv2's released ``arch`` weights (with or without registers)."""
    if not arch_spec(arch).released:
        released = sorted(name for name, spec in ARCHS.items() if spec.released)
        raise ValueError(f"DINOv2 released no {arch} weights: expected one of {released}")
    return BackboneSpec.named(arch, num_register_tokens=num_register_tokens)


def build_backbone(
    arch: str, drop_path_rate: float = 0.0, drop_path_uniform: bool = True, **settings
) -> DinoVisionTransformer:
    """A registered architecture with any ``BackboneSpec`` settings (patch_size=14,
    img_size=518, num_register_tokens=0, ffn_layer=None, layerscale_init=1e-5, ...)."""
    return BackboneSpec.named(arch, **settings).build(drop_path_rate, drop_path_uniform)


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section of a run's config (defaults: official ``ssl_default_config.yaml``)."""

    arch: str = "vit_large"
    patch_size: int = 16
    img_size: int | None = None  # position-embedding grid size; None: the global crop size (official training)
    in_chans: int = 3
    num_register_tokens: int = 0
    ffn_layer: str | None = None  # None: the architecture's default
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    layerscale_init: float = 1e-5
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def __post_init__(self) -> None:
        arch_spec(self.arch)
        if self.ffn_layer is not None and self.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer must be one of {FFN_LAYERS} or null, got {self.ffn_layer!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    def backbone(self, global_crops_size: int) -> BackboneSpec:
        """The network this config trains (its position grid: ``img_size``, else the global crop size)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(BackboneSpec) if hasattr(self, f.name)}
        return BackboneSpec.named(self.arch, **shared | {"img_size": self.img_size or global_crops_size})
