"""``model/`` is imported as ``dinoforge.model`` (setup.py maps the folder): the ViT, its heads
and losses, and the DINOv2 objective (``from dinoforge.model import build_backbone``). The
data side (augmentation, iBOT masks) lives in ``dinoforge.data``, the optimizer and schedules
in ``dinoforge.training``.

spec.py       the architecture registry (ARCHS), BackboneSpec, ModelConfig, build_backbone
vit.py        DinoVisionTransformer (official parameter names), packed multi-crop forward
layers.py     attention, MLP / SwiGLU, LayerScale, blocks with packed stochastic depth
heads.py      DINOHead: MLP, bottleneck, weight-normalised prototypes
losses.py     DINO, iBOT (+ fused prototype variants), KoLeo, Sinkhorn-Knopp, softmax centering
objective.py  ObjectiveConfig, the heads it trains and the weighted DINO + iBOT + KoLeo loss
meta_arch.py  what both training models share, and the interface sharding / EMA / export use
ssl.py        SSLMetaArch: student + EMA teacher (pretraining)
distill.py    DistillMetaArch: frozen teacher, student, spare EMA (distillation)
"""

from dinoforge.model.distill import DistillMetaArch
from dinoforge.model.meta_arch import MetaArch
from dinoforge.model.spec import ARCHS, BackboneSpec, build_backbone
from dinoforge.model.ssl import SSLMetaArch
from dinoforge.model.vit import DinoVisionTransformer

# The model each training stage trains (``Config.stage``).
META_ARCHS: dict[str, type[MetaArch]] = {"pretrain": SSLMetaArch, "distill": DistillMetaArch}

__all__ = [
    "ARCHS",
    "META_ARCHS",
    "BackboneSpec",
    "DinoVisionTransformer",
    "DistillMetaArch",
    "MetaArch",
    "SSLMetaArch",
    "build_backbone",
]
