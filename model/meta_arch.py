"""What the pretraining and distillation models share, and the narrow interface through
which the general layers (sharding, EMA, gradient clipping, export) see them.

A meta-architecture holds a ``student`` and a ``teacher`` branch (``nn.ModuleDict`` with
``backbone``, ``dino_head``, ``ibot_head``) and answers:

* ``shard_units()``: the modules FSDP shards, in order (each block, then each backbone and
  head), with how each is sharded: the sharding plan lives next to the model, as
  torchtitan's per-model ``parallelize``;
* ``ema_pairs()``: the parameters an EMA updates and the ones it follows;
* ``student_modules()``: the trained modules, each clipped on its own;
* ``released_branch``: the branch whose backbone the run releases (``export``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinoforge.model.losses import SoftmaxCentering, sinkhorn_knopp
from dinoforge.model.objective import ObjectiveConfig, compiled, objective


@dataclass(frozen=True)
class Levers:
    """How a step is computed, not what: the fused prototype loss, ``torch.compile`` of each
    block and of the losses, activation checkpointing of each block (``train.*`` settings)."""

    fused_loss: bool = False
    compile: bool = False
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class ShardUnit:
    module: nn.Module
    reduce_in_fp32: bool = False  # gradients reduced in fp32 (the heads) instead of the compute precision
    reshard_after_forward: bool | None = None  # None: FSDP's default
    forward_methods: tuple[str, ...] = ()  # methods besides forward that FSDP must hook


def unique_modules(*modules: nn.Module) -> list[nn.Module]:
    """``modules`` with repeats (a shared iBOT head) left out, in order."""
    return list({id(module): module for module in modules}.values())


class MetaArch(nn.Module):
    released_branch: str
    student: nn.ModuleDict
    teacher: nn.ModuleDict

    def __init__(self, cfg: ObjectiveConfig, levers: Levers) -> None:
        super().__init__()
        self.cfg, self.levers = cfg, levers

    def _apply_levers(self) -> None:
        """Activation checkpointing and compiled blocks for the backbones that run forward."""
        for backbone in (self.student["backbone"], self.teacher["backbone"]):
            backbone.activation_checkpointing = self.levers.activation_checkpointing
            if self.levers.compile:
                for block in backbone.blocks:
                    # Static shapes: the teacher's and the student's token counts differ, and
                    # automatic dynamic shapes would trade both for one slower symbolic graph.
                    block.compile(dynamic=False)

    def _add_centering(self, dino_prototypes: int, ibot_prototypes: int) -> None:
        if self.cfg.centering == "softmax":
            self.dino_center = SoftmaxCentering(dino_prototypes, self.cfg.center_momentum)
            self.ibot_center = SoftmaxCentering(ibot_prototypes, self.cfg.center_momentum)

    def _targets(self, logits: Tensor, temperature: float, center: str) -> Tensor:
        """Teacher distributions: Sinkhorn-Knopp, or softmax centering with this model's
        ``center`` (then updated with these logits)."""
        if self.cfg.centering == "sinkhorn_knopp":
            sinkhorn = compiled(sinkhorn_knopp) if self.levers.compile else sinkhorn_knopp
            return sinkhorn(logits, temperature, self.cfg.sinkhorn_iterations)
        centering: SoftmaxCentering = getattr(self, center)
        targets = centering.targets(logits, temperature)
        centering.update(logits)
        return targets

    @torch.no_grad()
    def teacher_targets(
        self, global_crops: Tensor, temperature: float, patch_rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Centred teacher distributions for the global crops' CLS tokens (2B, K) and for their
        patch tokens (rows of the flattened (2B * P) tokens: ``patch_rows``, else all), (M, K)."""
        out = self.teacher["backbone"].forward_features(global_crops)
        cls_logits = self.teacher["dino_head"](out["x_norm_clstoken"])
        patches = out["x_norm_patchtokens"].flatten(0, 1)
        patch_logits = self.teacher["ibot_head"](patches if patch_rows is None else patches[patch_rows])
        return self._targets(cls_logits, temperature, "dino_center"), self._targets(
            patch_logits, temperature, "ibot_center"
        )

    def _objective(self, *tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``objective.objective`` with this model's config, student heads and levers on
        (student CLS tokens, DINO targets, student patch tokens, iBOT targets, masks, the student's
        global-crop CLS tokens): the total loss and its detached parts."""
        heads = (self.student["dino_head"], self.student["ibot_head"])
        return objective(self.cfg, heads, *tokens, fused=self.levers.fused_loss, compile=self.levers.compile)

    # -- the interface of the general layers --------------------------------------------
    def branches(self) -> list[nn.ModuleDict]:
        return [self.student, self.teacher]

    def shard_units(self) -> list[ShardUnit]:
        """Every branch alike (so an EMA runs shard by shard): each block, the backbone (FSDP
        must also hook ``forward_features``, which the step calls), each head. The student's
        root modules stay gathered after forward (saving the re-gather in backward); the other
        branches have no backward and reshard."""
        units = []
        for branch in self.branches():
            reshard = None if branch is self.student else True
            backbone = branch["backbone"]
            units += [ShardUnit(block) for block in backbone.blocks]
            units.append(ShardUnit(backbone, reshard_after_forward=reshard, forward_methods=("forward_features",)))
            heads = unique_modules(branch["dino_head"], branch["ibot_head"])
            units += [ShardUnit(head, reduce_in_fp32=True, reshard_after_forward=reshard) for head in heads]
        return units

    def ema_pairs(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(EMA parameters, the student parameters they follow), in matching order."""
        raise NotImplementedError

    def student_modules(self) -> list[nn.Module]:
        return unique_modules(*self.student.values())
