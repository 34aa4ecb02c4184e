"""DINOv2 Vision Transformer, readable top to bottom.

Parameter names and shapes are exactly those of the released DINOv2 backbones
(facebookresearch/dinov2 ``DinoVisionTransformer`` with ``block_chunks=0``), so official
weights load with ``load_state_dict(strict=True)`` (``spec.py`` names the architectures and
builds them). Differences that do not change the maths: attention uses
``F.scaled_dot_product_attention`` instead of xformers, and crops of different sizes are
packed through each block (see ``layers.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinoforge.model.layers import Block


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
        # The stride-p convolution as one matmul over flattened patches (same weights, same
        # result): cuDNN runs it as an implicit GEMM plus layout conversions, ~7 ms of a 97-ms
        # ViT-S/14 step on an H200 (benchmarks/records/2026-11-27-h200-2/vits14.profile.txt).
        h, w = height // p, width // p
        patches = x.reshape(batch, channels, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, channels * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        num_register_tokens: int = 0,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        layerscale_init: float | None = 1e-5,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.activation_checkpointing = False  # set by the trainer (train.activation_checkpointing)
        grid = img_size // patch_size

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        # Official recipes use the same drop rate in every block (drop_path_uniform: true).
        rates = [drop_path_rate] * depth if drop_path_uniform else torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, ffn_layer, layerscale_init, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: truncated normal(0.02) for pos_embed and linears, ~0 for tokens."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    # -- tokens -----------------------------------------------------------------------
    def interpolate_pos_encoding(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        """Position embeddings for an image of ``height`` x ``width`` pixels.

        The learned grid (37x37 at img_size 518) is resized bicubically. As in the official
        code, the target is given as a scale factor ``(h0 + offset) / M`` rather than a size
        (the offset of 0.1 avoids a floating-point rounding issue in ``interpolate``), and the
        unchanged grid is returned as is only for square inputs of the training size.
        """
        grid_tokens = self.pos_embed.shape[1] - 1
        h0, w0 = height // self.patch_size, width // self.patch_size
        if h0 * w0 == grid_tokens and h0 == w0:
            return self.pos_embed.to(dtype)
        side = int(math.sqrt(grid_tokens))
        pos = self.pos_embed.float()
        patch_pos = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            resize = {"scale_factor": ((h0 + self.interpolate_offset) / side, (w0 + self.interpolate_offset) / side)}
        else:
            resize = {"size": (h0, w0)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **resize)
        if patch_pos.shape[-2:] != (h0, w0):
            raise RuntimeError(f"position embedding resized to {tuple(patch_pos.shape[-2:])}, expected {(h0, w0)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(dtype)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + registers + patches, D). Masked patches (iBOT) are
        replaced by the mask token before position embeddings are added; registers carry
        no position embedding."""
        height, width = x.shape[-2:]
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(height, width, tokens.dtype)
        if self.num_register_tokens:
            registers = self.register_tokens.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    # -- forward ----------------------------------------------------------------------
    def _run_blocks(self, groups: list[Tensor], keep: set[int] | None = None) -> tuple[list[Tensor], list[list[Tensor]]]:
        """Runs every group of token batches through the blocks as one packed tensor.
        Returns the final tokens per group and, for block indices in ``keep``, the
        intermediate tokens per group."""
        shapes = [(g.shape[0], g.shape[1]) for g in groups]
        sizes = [b * n for b, n in shapes]
        x = torch.cat([g.reshape(-1, self.embed_dim) for g in groups]) if len(groups) > 1 else groups[0].reshape(-1, self.embed_dim)
        kept: list[list[Tensor]] = []
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            # Activation checkpointing keeps only each block's input and recomputes the rest in
            # backward (same RNG state, so stochastic depth drops the same rows).
            x = checkpoint(block, x, shapes, use_reentrant=False) if recompute else block(x, shapes)
            if keep is not None and index in keep:
                kept.append([t.view(b, n, -1) for t, (b, n) in zip(x.split(sizes), shapes)])
        return [t.view(b, n, -1) for t, (b, n) in zip(x.split(sizes), shapes)], kept

    def _output_dict(self, tokens: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        normed = self.norm(tokens)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : r + 1],
            "x_norm_patchtokens": normed[:, r + 1 :],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def forward_features_list(self, images: list[Tensor], masks: list[Tensor | None]) -> list[dict[str, Tensor | None]]:
        """Packed multi-crop forward: crop batches of different sizes share every block."""
        groups = [self.prepare_tokens(x, m) for x, m in zip(images, masks)]
        outputs, _ = self._run_blocks(groups)
        return [self._output_dict(t, m) for t, m in zip(outputs, masks)]

    def forward_features(self, x: Tensor | list[Tensor], masks: Tensor | list | None = None):
        if isinstance(x, list):
            return self.forward_features_list(x, masks if masks is not None else [None] * len(x))
        return self.forward_features_list([x], [masks])[0]

    def forward(self, x: Tensor, is_training: bool = False):
        features = self.forward_features(x)
        return features if is_training else self.head(features["x_norm_clstoken"])

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the block indices in ``n``), as in the
        official API: patch tokens (B, N, D) or, with ``reshape``, (B, D, h, w); with
        ``return_class_token`` each entry is (patch tokens, class token)."""
        depth = len(self.blocks)
        keep = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        _, kept = self._run_blocks([self.prepare_tokens(x)], keep)
        outputs = [group[0] for group in kept]
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            h, w = height // self.patch_size, width // self.patch_size
            outputs = [out.reshape(batch, h, w, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

