"""The exponential moving average of a model's parameters, known only through
``ema_pairs()`` (the EMA teacher of pretraining, the spare EMA of distillation)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from dinoforge.model.meta_arch import MetaArch


def _local(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.to_local() if isinstance(p, DTensor) else p for p in params]


@torch.no_grad()
def update_ema(model: MetaArch, momentum: float) -> None:
    """ema <- m * ema + (1 - m) * source (DINO §3.1) as one fused lerp. Under FSDP both sides
    are sharded alike, so each rank updates its own shards."""
    targets, sources = model.ema_pairs()
    torch._foreach_lerp_(_local(targets), _local(sources), 1.0 - momentum)
