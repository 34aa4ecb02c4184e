"""DINOv2 distillation (paper §5; official distillation recipe): a large frozen pretrained
teacher (backbone with its DINO and iBOT heads) teaches a smaller student.

Differences from the self-supervised objective (``dinoforge.model.ssl``):

* the teacher is frozen (no EMA) and may be a different, larger architecture;
* the student uses no masking and no stochastic depth;
* the iBOT loss runs on every patch token of the global crops (nothing is masked);
* a spare EMA of the student (``self.ema``) is the model that gets exported.

The training loop drives it exactly like ``SSLMetaArch``: ``forward(global_crops, local_crops,
masks, teacher_temperature)``, then the EMA over ``ema_pairs()`` after each optimizer step, which
here updates the spare EMA.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dinoforge.model.heads import DINOHead
from dinoforge.model.meta_arch import Levers, MetaArch
from dinoforge.model.objective import ObjectiveConfig, build_heads
from dinoforge.model.vit import DinoVisionTransformer


def _n_prototypes(head: DINOHead) -> int:
    return head.last_layer.weight_v.shape[0]


def _in_dim(head: DINOHead) -> int:
    return head.mlp[0].in_features


def random_frozen_heads(embed_dim: int, cfg: ObjectiveConfig, seed: int) -> tuple[DINOHead, DINOHead]:
    """Seeded random, frozen DINO and iBOT heads for a teacher that comes without heads
    (official-format backbone weights ship only the backbone).

    The heads are built as a student's are (``build_heads``: ``cfg.dino_head`` / ``cfg.ibot_head``,
    shared when ``cfg.separate_ibot_head`` is false) with their usual random initialisation drawn
    from ``seed``: the same seed always gives the same heads, and the global RNG is left as it was.
    They are never trained, so the student then learns to match the teacher's features through a
    fixed random projection onto K prototypes, not through prototypes the teacher learned.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dino, ibot = build_heads(embed_dim, cfg)
    for head in (dino, ibot):
        head.requires_grad_(False)
        head.eval()
    return dino, ibot


class DistillMetaArch(MetaArch):
    released_branch = "ema"  # the spare EMA of the student is the model a distillation run releases

    def __init__(
        self,
        student_backbone: DinoVisionTransformer,
        teacher_backbone: DinoVisionTransformer,
        teacher_dino_head: DINOHead,
        teacher_ibot_head: DINOHead,
        cfg: ObjectiveConfig,
        levers: Levers = Levers(),
    ) -> None:
        """``student_backbone`` must have no stochastic depth (build it with drop_path_rate 0);
        the student heads are new heads from ``cfg`` whose prototype counts must equal the teacher
        heads'. The teacher modules are frozen in place; the spare EMA starts as the student."""
        super().__init__(cfg, levers)
        rates = [block.drop_path_rate for block in student_backbone.blocks]
        if any(rate != 0.0 for rate in rates):
            raise ValueError(
                f"distillation uses no stochastic depth, but the student's blocks have drop_path_rate {rates}"
            )
        if student_backbone.patch_size != teacher_backbone.patch_size:
            raise ValueError(
                f"student patch size {student_backbone.patch_size} != teacher patch size "
                f"{teacher_backbone.patch_size}: the iBOT loss pairs student and teacher patch tokens one to one"
            )
        for name, head in (("dino", teacher_dino_head), ("ibot", teacher_ibot_head)):
            if _in_dim(head) != teacher_backbone.embed_dim:
                raise ValueError(
                    f"teacher {name} head takes {_in_dim(head)}-dim inputs, "
                    f"teacher backbone embed_dim is {teacher_backbone.embed_dim}"
                )
        dino_head, ibot_head = build_heads(student_backbone.embed_dim, cfg)
        for name, student_head, teacher_head in (
            ("dino", dino_head, teacher_dino_head),
            ("ibot", ibot_head, teacher_ibot_head),
        ):
            if _n_prototypes(student_head) != _n_prototypes(teacher_head):
                raise ValueError(
                    f"student {name} head has {_n_prototypes(student_head)} prototypes (objective config) but the "
                    f"teacher {name} head has {_n_prototypes(teacher_head)}: they must be equal"
                )
        self.student = nn.ModuleDict({"backbone": student_backbone, "dino_head": dino_head, "ibot_head": ibot_head})
        self.teacher = nn.ModuleDict(
            {"backbone": teacher_backbone, "dino_head": teacher_dino_head, "ibot_head": teacher_ibot_head}
        )
        self.teacher.requires_grad_(False)
        self.ema = copy.deepcopy(self.student)
        self.ema.requires_grad_(False)
        # Sized from the heads (equal to cfg's counts unless the iBOT head is shared).
        self._add_centering(_n_prototypes(teacher_dino_head), _n_prototypes(teacher_ibot_head))
        self._apply_levers()
        self.train()

    def train(self, mode: bool = True) -> "DistillMetaArch":
        super().train(mode)
        self.teacher.eval()  # frozen, pretrained: always in inference mode
        self.ema.eval()  # only ever updated as an EMA, never run in training mode
        return self

    def forward(
        self,
        global_crops: Tensor,
        local_crops: Tensor | None,
        masks: Tensor | None,
        teacher_temperature: float,
        mask_rows: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """global_crops (2B, 3, G, G) and local_crops (nL*B, 3, L, L) are crop-major, as for
        ``SSLMetaArch``. ``masks`` and ``mask_rows`` are accepted for the same interface and ignored: nothing is
        masked, and the iBOT loss covers every patch of the global crops, each image weighted
        equally. Returns the total loss and its detached parts."""
        del masks, mask_rows  # no masking in distillation
        dino_targets, ibot_targets = self.teacher_targets(global_crops, teacher_temperature)

        crops = [global_crops] + ([local_crops] if local_crops is not None and len(local_crops) else [])
        outputs = self.student["backbone"].forward_features(crops)
        global_patches = outputs[0]["x_norm_patchtokens"]  # (2B, P, D)
        cls_tokens = torch.cat([out["x_norm_clstoken"] for out in outputs])
        all_patches = torch.ones(global_patches.shape[:2], dtype=torch.bool, device=global_patches.device)
        return self._objective(
            cls_tokens,
            dino_targets,
            global_patches.flatten(0, 1),
            ibot_targets,
            all_patches,
            outputs[0]["x_norm_clstoken"],
        )

    def branches(self) -> list[nn.ModuleDict]:
        return [self.student, self.teacher, self.ema]  # the spare EMA is sharded like the student

    def ema_pairs(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The spare EMA follows the student; the frozen teacher never changes."""
        return list(self.ema.parameters()), list(self.student.parameters())
