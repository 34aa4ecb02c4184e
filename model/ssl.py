"""The DINOv2 self-supervised model: student and EMA teacher, and one step's loss.

Paper §4: an EMA teacher sees the two global crops; the student sees the global crops
(half of them with iBOT block masks) and the local crops, packed through one forward; the
loss is ``objective.objective`` (DINO + iBOT + KoLeo).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from dinoforge.model.meta_arch import Levers, MetaArch
from dinoforge.model.objective import ObjectiveConfig, build_heads, masked_rows
from dinoforge.model.vit import DinoVisionTransformer


class SSLMetaArch(MetaArch):
    released_branch = "teacher"  # the EMA teacher is the model a pretraining run releases

    def __init__(
        self,
        make_backbone: Callable[[float], DinoVisionTransformer],
        drop_path_rate: float,
        cfg: ObjectiveConfig,
        levers: Levers = Levers(),
        packed: bool = True,
    ) -> None:
        """``make_backbone(drop_path_rate)`` builds one backbone; the teacher gets no
        stochastic depth and starts as a copy of the student (official recipe).
        ``packed=False`` runs the student once per crop instead (the benchmark baseline)."""
        super().__init__(cfg, levers)
        self.packed = packed
        backbone = make_backbone(drop_path_rate)
        dino_head, ibot_head = build_heads(backbone.embed_dim, cfg)
        self.student = nn.ModuleDict({"backbone": backbone, "dino_head": dino_head, "ibot_head": ibot_head})
        teacher_backbone = make_backbone(0.0)
        teacher_backbone.load_state_dict(backbone.state_dict())
        teacher_dino = copy.deepcopy(dino_head)
        teacher_ibot = copy.deepcopy(ibot_head) if cfg.separate_ibot_head else teacher_dino
        self.teacher = nn.ModuleDict(
            {"backbone": teacher_backbone, "dino_head": teacher_dino, "ibot_head": teacher_ibot}
        )
        self.teacher.requires_grad_(False)
        self._add_centering(cfg.dino_head.n_prototypes, cfg.ibot_head.n_prototypes)
        self._apply_levers()

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # the teacher never uses stochastic depth
        return self

    def forward(
        self,
        global_crops: Tensor,
        local_crops: Tensor | None,
        masks: Tensor,
        teacher_temperature: float,
        mask_rows: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """global_crops (2B, 3, G, G) and local_crops (nL*B, 3, L, L) are crop-major
        (all images' crop 0, then crop 1, ...); masks (2B, patches) bool; ``mask_rows`` their
        ``masks.flatten().nonzero()``, best found where the masks were drawn (on the host):
        finding them on the GPU makes the host wait for the device at every step.
        Returns the total loss and its detached parts."""
        batch = global_crops.shape[0] // 2
        if mask_rows is None:
            mask_rows = masked_rows(masks)
        dino_targets, ibot_targets = self.teacher_targets(global_crops, teacher_temperature, mask_rows)

        crops = [global_crops] + ([local_crops] if local_crops is not None and len(local_crops) else [])
        outputs = self._student_features(crops, [masks] + [None] * (len(crops) - 1), batch)
        cls_tokens = torch.cat([out["x_norm_clstoken"] for out in outputs])
        patch_tokens = outputs[0]["x_norm_patchtokens"].flatten(0, 1)[mask_rows]
        return self._objective(
            cls_tokens, dino_targets, patch_tokens, ibot_targets, masks, outputs[0]["x_norm_clstoken"]
        )

    def _student_features(self, crops: list[Tensor], masks: list[Tensor | None], batch: int) -> list[dict]:
        backbone = self.student["backbone"]
        if self.packed:
            return backbone.forward_features(crops, masks)
        outputs = []
        for images, group_masks in zip(crops, masks):
            n_crops = len(images) // batch
            per_crop = [
                backbone.forward_features(x, m)
                for x, m in zip(
                    images.chunk(n_crops), group_masks.chunk(n_crops) if group_masks is not None else [None] * n_crops
                )
            ]
            outputs.append(
                {key: torch.cat([out[key] for out in per_crop]) for key in ("x_norm_clstoken", "x_norm_patchtokens")}
            )
        return outputs

    def ema_pairs(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The teacher follows the student (DINO §3.1)."""
        return list(self.teacher.parameters()), list(self.student.parameters())
