"""Backbone: official key layout and parameter counts, features equal to an independent
functional re-implementation of the official forward, packed == per-crop forward."""

import math

import pytest
import torch
import torch.nn.functional as F

from dinoforge.model.layers import Block, _kept_rows, swiglu_hidden_dim
from dinoforge.model import DinoVisionTransformer, build_backbone
from dinoforge.model.spec import BackboneSpec, official_spec

OFFICIAL_COUNTS = {"vit_small": 22_056_576, "vit_base": 86_580_480, "vit_large": 304_368_640, "vit_giant2": 1_136_480_768}
WIDTHS = {"vit_small": 384, "vit_base": 768, "vit_large": 1024, "vit_giant2": 1536}


def official_layout(embed_dim: int, depth: int, patch: int, grid: int, registers: int, swiglu: bool, mlp_hidden: int) -> dict[str, tuple]:
    """Key -> shape of a released DINOv2 backbone checkpoint, written from the key list."""
    d = embed_dim
    keys = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, patch, patch),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if registers:
        keys["register_tokens"] = (1, registers, d)
    for i in range(depth):
        b = f"blocks.{i}."
        keys |= {
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "ls2.gamma": (d,),
        }
        if swiglu:
            h = swiglu_hidden_dim(mlp_hidden)
            keys |= {b + "mlp.w12.weight": (2 * h, d), b + "mlp.w12.bias": (2 * h,), b + "mlp.w3.weight": (d, h), b + "mlp.w3.bias": (d,)}
        else:
            keys |= {b + "mlp.fc1.weight": (mlp_hidden, d), b + "mlp.fc1.bias": (mlp_hidden,), b + "mlp.fc2.weight": (d, mlp_hidden), b + "mlp.fc2.bias": (d,)}
    return keys


def random_official_weights(layout: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in layout.items():
        if key.endswith("gamma"):
            weights[key] = 0.5 + 0.5 * torch.rand(shape, generator=g)  # large enough that every block matters
        elif key.startswith("norm") or ".norm" in key:
            weights[key] = (1.0 if key.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
        else:
            weights[key] = 0.05 * torch.randn(shape, generator=g)
    return weights


def reference_forward(w: dict, x: torch.Tensor, *, patch: int, heads: int, depth: int, registers: int, swiglu: bool,
                      offset: float = 0.1, antialias: bool = False, n_last: int = 1):
    """The official DinoVisionTransformer maths written out functionally (no shared code)."""
    batch, _, height, width = x.shape
    d = w["cls_token"].shape[-1]
    t = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([w["cls_token"].expand(batch, 1, d), t], dim=1)
    pos = w["pos_embed"]
    n_pos = pos.shape[1] - 1
    side = int(math.sqrt(n_pos))
    h0, w0 = height // patch, width // patch
    if not (h0 * w0 == n_pos and height == width):
        grid = pos[:, 1:].reshape(1, side, side, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + offset) / side, (w0 + offset) / side), mode="bicubic", antialias=antialias)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, d)], dim=1)
    t = t + pos
    if registers:
        t = torch.cat([t[:, :1], w["register_tokens"].expand(batch, registers, d), t[:, 1:]], dim=1)
    hd = d // heads
    intermediates = []
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(t, (d,), w[b + "norm1.weight"], w[b + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(y, w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"]).reshape(batch, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(batch, -1, d)
        t = t + w[b + "ls1.gamma"] * F.linear(y, w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
        y = F.layer_norm(t, (d,), w[b + "norm2.weight"], w[b + "norm2.bias"], eps=1e-6)
        if swiglu:
            a, g = F.linear(y, w[b + "mlp.w12.weight"], w[b + "mlp.w12.bias"]).chunk(2, dim=-1)
            y = F.linear(F.silu(a) * g, w[b + "mlp.w3.weight"], w[b + "mlp.w3.bias"])
        else:
            y = F.linear(F.gelu(F.linear(y, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"])), w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"])
        t = t + w[b + "ls2.gamma"] * y
        if i >= depth - n_last:
            intermediates.append(F.layer_norm(t, (d,), w["norm.weight"], w["norm.bias"], eps=1e-6))
    return intermediates


@pytest.mark.parametrize("arch", list(OFFICIAL_COUNTS))
@pytest.mark.parametrize("registers", [0, 4])
def test_official_parameter_counts_and_strict_load(arch, registers):
    with torch.device("meta"):
        model = official_spec(arch, registers).build()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_COUNTS[arch] + WIDTHS[arch] * registers
    spec_depth = len(model.blocks)
    layout = official_layout(WIDTHS[arch], spec_depth, 14, 37, registers, arch == "vit_giant2", 4 * WIDTHS[arch])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout


@pytest.mark.parametrize("swiglu,registers", [(False, 0), (False, 4), (True, 4)])
@pytest.mark.parametrize("size", [(518, 518), (224, 224), (70, 98), (126, 56)])
def test_features_equal_official_maths(swiglu, registers, size):
    d, depth, heads, patch = 64, 3, 4, 14
    weights = random_official_weights(official_layout(d, depth, patch, 37, registers, swiglu, 4 * d))
    model = DinoVisionTransformer(img_size=518, patch_size=patch, embed_dim=d, depth=depth, num_heads=heads,
                                  ffn_layer="swiglu" if swiglu else "mlp", num_register_tokens=registers)
    model.load_state_dict(weights, strict=True)
    model.eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.forward_features(x)
        ref = reference_forward(weights, x, patch=patch, heads=heads, depth=depth, registers=registers, swiglu=swiglu, n_last=2)
        inter = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    final = ref[-1]
    torch.testing.assert_close(out["x_norm_clstoken"], final[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_regtokens"], final[:, 1 : 1 + registers], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], final[:, 1 + registers :], atol=1e-5, rtol=1e-5)
    h, w = size[0] // patch, size[1] // patch
    for (patches, cls), expected in zip(inter, ref):
        assert patches.shape == (2, d, h, w)
        torch.testing.assert_close(patches, expected[:, 1 + registers :].reshape(2, h, w, d).permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cls, expected[:, 0], atol=1e-5, rtol=1e-5)


def test_antialias_and_offset_conventions_matter():
    """The reference with the same flags agrees; with the other flags it does not, so the
    flags really reach the interpolation."""
    d, depth, heads, patch = 32, 1, 2, 14
    weights = random_official_weights(official_layout(d, depth, patch, 37, 0, False, 4 * d), seed=3)
    x = torch.randn(1, 3, 98, 140)
    for antialias, offset in [(True, 0.1), (False, 0.0)]:
        model = DinoVisionTransformer(img_size=518, patch_size=patch, embed_dim=d, depth=depth, num_heads=heads,
                                      interpolate_antialias=antialias, interpolate_offset=offset)
        model.load_state_dict(weights)
        model.eval()
        with torch.no_grad():
            got = model.forward_features(x)["x_norm_patchtokens"]
            same = reference_forward(weights, x, patch=patch, heads=heads, depth=depth, registers=0, swiglu=False, offset=offset, antialias=antialias)[-1][:, 1:]
            other = reference_forward(weights, x, patch=patch, heads=heads, depth=depth, registers=0, swiglu=False)[-1][:, 1:]
        torch.testing.assert_close(got, same, atol=1e-5, rtol=1e-5)
        assert (got - other).abs().max() > 1e-3


def test_packed_forward_equals_per_crop_forward():
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_register_tokens=2,
                                  layerscale_init=0.5).eval()
    globals_, locals_ = torch.randn(6, 3, 32, 32), torch.randn(12, 3, 16, 16)
    masks = torch.rand(6, 64) < 0.3
    with torch.no_grad():
        packed = model.forward_features([globals_, locals_], [masks, None])
        separate = [model.forward_features(globals_, masks), model.forward_features(locals_)]
    for p, s in zip(packed, separate):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(p[key], s[key], atol=1e-5, rtol=1e-5)


def test_mask_token_replaces_masked_patches():
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2).eval()
    torch.nn.init.normal_(model.mask_token)
    everything = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        a = model.forward_features(torch.randn(2, 3, 16, 16), everything)["x_norm_patchtokens"]
        b = model.forward_features(torch.randn(2, 3, 16, 16), everything)["x_norm_patchtokens"]
        c = model.forward_features(torch.randn(2, 3, 16, 16))["x_norm_patchtokens"]
    torch.testing.assert_close(a, b)  # fully masked: the image content no longer matters
    assert (a - c).abs().max() > 1e-2


def test_efficient_stochastic_depth_runs_branch_on_kept_subset_only():
    torch.manual_seed(0)
    block = Block(16, 2, drop_path_rate=0.5, layerscale_init=1.0).train()
    rows_seen = []
    block.mlp.fc1.register_forward_hook(lambda m, inp, out: rows_seen.append(inp[0].shape[0]))
    block.attn.qkv.register_forward_hook(lambda m, inp, out: rows_seen.append(inp[0].shape[0]))
    shapes = [(8, 5), (6, 3)]
    x = torch.randn(8 * 5 + 6 * 3, 16)
    block(x, shapes)
    assert rows_seen == [4 * 5 + 3 * 3] * 2  # int(8 * 0.5) and int(6 * 0.5) samples per branch

    rows, scale, kept = _kept_rows([(8, 5), (3, 2)], 0.5, torch.device("cpu"))
    assert kept == [(4, 5), (1, 2)]
    assert rows.shape == (4 * 5 + 1 * 2,)
    assert torch.equal(scale[:20, 0], torch.full((20,), 2.0)) and torch.equal(scale[20:, 0], torch.full((2,), 3.0))
    samples = (rows[:20] // 5).unique()
    assert len(samples) == 4 and all(set(range(s * 5, s * 5 + 5)) <= set(rows[:20].tolist()) for s in samples.tolist())
    assert rows[20:].min() >= 40  # the second group's rows start after the first group's 8 * 5 tokens


def test_eval_mode_is_deterministic_and_training_drop_path_is_unbiased():
    torch.manual_seed(0)
    block = Block(8, 2, drop_path_rate=0.25, layerscale_init=1.0)
    x = torch.randn(4 * 3, 8)
    block.eval()
    with torch.no_grad():
        reference = block._attn_residual(x, [(4, 3)])
        block.train()
        total = torch.zeros_like(x)
        draws = 2000
        for _ in range(draws):
            rows, scale, _ = _kept_rows([(4, 3)], 0.25, x.device)
            total.index_add_(0, rows, reference[rows] * scale)
    torch.testing.assert_close(total / draws, reference, atol=0.05 * reference.abs().max().item(), rtol=0)


def test_spec_round_trips_through_export_metadata():
    spec = BackboneSpec.named("vit_giant2", patch_size=4, img_size=16, num_register_tokens=2)
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.ffn_layer) == (1536, 40, 24, "swiglu")
    assert BackboneSpec.from_meta({"arch": "vit_giant2", "image_size": 16, **spec.to_meta()}) == spec
    with torch.device("meta"):
        assert official_spec("vit_small").build().state_dict().keys() == build_backbone("vit_small").state_dict().keys()


def test_rejects_sizes_not_divisible_by_patch():
    model = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_huge")


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_backbone("vit_nano", patch_size=4, img_size=16, drop_path_rate=0.3)
    model.train()
    crops = [torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)]

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)  # the same stochastic-depth draws
        sum(out["x_norm_clstoken"].square().sum() for out in model.forward_features(crops)).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, recomputed = grads(False), grads(True)
    assert len(plain) == len(recomputed) > 0
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
