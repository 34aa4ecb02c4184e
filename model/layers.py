"""Transformer building blocks with the official DINOv2 parameter names.

Every block works on a *packed* token tensor: the tokens of all crops flattened to one
``(T, D)`` matrix plus the list of ``(batch, seq_len)`` shapes of the crop groups in it.
Norms, linear layers and the MLP (the bulk of the FLOPs) then run once over every crop,
while attention is computed per group, so a token only attends within its own crop. An
ordinary ``(B, N, D)`` batch is the special case of one group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GroupShapes = list[tuple[int, int]]


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT); DINOv2 initialises gamma at 1e-5."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(hidden_dim: int) -> int:
    """SwiGLU keeps the MLP's parameter count: 2/3 of the hidden width, rounded up to a
    multiple of 8 (official ``SwiGLUFFNFused``; ViT-g: 4 * 1536 -> 4096)."""
    return (int(hidden_dim * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        hidden = swiglu_hidden_dim(hidden_dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, shapes: GroupShapes) -> Tensor:
        qkv = self.qkv(x)
        dim = x.shape[-1]
        head_dim = dim // self.num_heads
        outputs = []
        for group, (batch, seq) in zip(qkv.split([b * n for b, n in shapes]), shapes):
            q, k, v = group.view(batch, seq, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v)
            outputs.append(out.transpose(1, 2).reshape(batch * seq, dim))
        return self.proj(torch.cat(outputs) if len(outputs) > 1 else outputs[0])


def _kept_rows(shapes: GroupShapes, drop_rate: float, device: torch.device) -> tuple[Tensor, Tensor, GroupShapes]:
    """Token rows of a random subset of each group's samples, and the rescaling per row.

    Efficient stochastic depth (official dinov2 ``drop_add_residual_stochastic_depth``): the
    residual branch runs only on ``max(int(B * (1 - p)), 1)`` samples and is scaled by
    ``B / kept`` so its expectation is unchanged, instead of computing it for every sample
    and zeroing some.
    """
    rows, scales, kept_shapes, offset = [], [], [], 0
    for batch, seq in shapes:
        kept = max(int(batch * (1.0 - drop_rate)), 1)
        samples = torch.randperm(batch, device=device)[:kept]
        rows.append((offset + samples[:, None] * seq + torch.arange(seq, device=device)).reshape(-1))
        scales.append(torch.full((kept * seq, 1), batch / kept, device=device))
        kept_shapes.append((kept, seq))
        offset += batch * seq
    return torch.cat(rows), torch.cat(scales), kept_shapes


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        layerscale_init: float | None = 1e-5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim, hidden)
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFN(dim, hidden)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}: expected 'mlp' or 'swiglu'")
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def _attn_residual(self, x: Tensor, shapes: GroupShapes) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), shapes))

    def _ffn_residual(self, x: Tensor, shapes: GroupShapes) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, shapes: GroupShapes) -> Tensor:
        if self.training and self.drop_path_rate > 0.0:
            for branch in (self._attn_residual, self._ffn_residual):
                rows, scale, kept_shapes = _kept_rows(shapes, self.drop_path_rate, x.device)
                kept = x[rows]
                residual = (branch(kept, kept_shapes) * scale).to(x.dtype)  # autocast may change dtypes
                # The rows are distinct, so a copy does what index_add would without its atomic
                # adds (bf16 index_add: ~6% of a ViT-S/14 step on an H200, benchmarks/records/).
                x = x.index_copy(0, rows, kept + residual)
            return x
        x = x + self._attn_residual(x, shapes)
        return x + self._ffn_residual(x, shapes)
