"""DINO / iBOT projection heads (DINO §3.1; DINOv2 §4 uses separate, untied heads)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, ``W = g * V / ||V||`` per output
    row. Written out instead of ``nn.utils.weight_norm`` so that the parameters are plain
    tensors (FSDP2 shards them like any other); ``g`` starts at 1 as in the official head."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, which the official head keeps
        nn.init.uniform_(self.weight_v, -bound, bound)

    def prototypes(self) -> Tensor:
        """The (out_dim, in_dim) weight g * V / ||V||."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.prototypes().to(x.dtype))


class DINOHead(nn.Module):
    """MLP (Linear-GELU x ``nlayers``-1, then to the bottleneck), L2 normalisation, and a
    weight-normalised prototype layer producing ``out_dim`` logits."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if index < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def features(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck: what the prototype layer scores."""
        x = self.mlp(x)
        # fp16 cannot represent the default eps of 1e-12 (official head uses 1e-6 there)
        return F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.features(x))
