"""``model/`` is imported as ``dinoforge.model`` (setup.py maps the folder): the ViT, its heads
and losses, and the DINOv2 objective (``from dinoforge.model import build_backbone``). The
data side (augmentation, iBOT masks) lives in ``dinoforge.data``, the optimizer and schedules
in ``dinoforge.training``.

spec.py       the architecture registry (ARCHS), BackboneSpec, ModelConfig, build_backbone
vit.py        DinoVisionTransformer (official parameter names), packed multi-crop forward
layers.py     attention, MLP / SwiGLU, LayerScale, blocks with packed stochastic depth
heads.py      DINOHead: MLP, bottleneck, weight-normalised prototypes
losses.py     DINO, iBOT (+ fused prototype variants), KoLeo, Sinkhorn-Knopp, softmax centering
ssl.py        ObjectiveConfig, SSLMetaArch: student + EMA teacher (pretraining)
distill.py    DistillMetaArch: frozen teacher, student, spare EMA (distillation)
"""

from dinoforge.model.spec import ARCHS, BackboneSpec, build_backbone
from dinoforge.model.vit import DinoVisionTransformer

__all__ = ["ARCHS", "BackboneSpec", "DinoVisionTransformer", "build_backbone"]
