import math

import pytest
import torch

from dinoforge.config import load_config
from dinoforge.training.build import build_meta_arch
from dinoforge.training.ema import update_ema
from dinoforge.training.optim import apply_schedules, param_groups
from dinoforge.training.schedules import Schedules

TINY = ["model.arch=vit_nano", "objective.dino_head.n_prototypes=64", "objective.ibot_head.n_prototypes=64",
        "objective.dino_head.hidden_dim=32", "objective.ibot_head.hidden_dim=32", "crops.local_crops_number=2"]


def tiny_batch(cfg, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    G, L = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    grid = (G // cfg.model.patch_size) ** 2
    masks = torch.zeros(2 * batch, grid, dtype=torch.bool)
    masks[0, :5] = True
    masks[3, 2:12] = True
    return (torch.randn(2 * batch, 3, G, G, generator=g), torch.randn(cfg.crops.local_crops_number * batch, 3, L, L, generator=g), masks)


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "softmax"])
def test_step_gives_finite_losses_and_grads_only_in_student(centering):
    cfg = load_config("smoke", TINY + [f"objective.centering={centering}"])
    torch.manual_seed(0)
    model = build_meta_arch(cfg).train()
    loss, parts = model(*tiny_batch(cfg), teacher_temperature=0.04)
    loss.backward()
    assert math.isfinite(loss.item()) and set(parts) == {"dino_loss", "ibot_loss", "koleo_loss"}
    # DINO/iBOT cross-entropies are bounded below by 0 and above by ~log K at init
    assert 0 < parts["dino_loss"] < math.log(64) + 1 and 0 < parts["ibot_loss"] < math.log(64) + 1
    expected = parts["dino_loss"] + parts["ibot_loss"] + 0.1 * parts["koleo_loss"]
    assert torch.allclose(loss.detach(), expected)
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student["backbone"].mask_token.grad.abs().sum() > 0  # iBOT reaches the mask token
    assert model.student["ibot_head"].mlp[0].weight.grad.abs().sum() > 0
    assert model.student["backbone"].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if centering == "softmax":
        assert model.dino_center.center.abs().sum() > 0  # the EMA center moved


def test_teacher_starts_as_student_and_follows_ema():
    cfg = load_config("smoke", TINY)
    model = build_meta_arch(cfg)
    for s, t in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(s, t)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in model.teacher.parameters()]
    update_ema(model, 0.9)
    for s, t, b in zip(model.student.parameters(), model.teacher.parameters(), before):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    assert model.teacher["backbone"].blocks[0].drop_path_rate == 0.0
    assert model.student["backbone"].blocks[0].drop_path_rate == cfg.model.drop_path_rate
    model.train()
    assert not model.teacher.training


def test_sharding_and_the_ema_see_the_model_through_its_interface():
    model = build_meta_arch(load_config("smoke", TINY))
    units = model.shard_units()
    modules = [unit.module for unit in units]
    for branch in (model.student, model.teacher):
        backbone = branch["backbone"]
        assert modules.index(backbone.blocks[-1]) < modules.index(backbone)  # inner units first
        assert units[modules.index(backbone)].forward_methods == ("forward_features",)
        assert units[modules.index(branch["ibot_head"])].reduce_in_fp32 and not units[0].reduce_in_fp32
    assert {id(p) for module in modules for p in module.parameters()} == {id(p) for p in model.parameters()}
    ema, followed = model.ema_pairs()
    assert [p.shape for p in ema] == [p.shape for p in followed] and len(ema) == len(list(model.teacher.parameters()))
    assert not any(p.requires_grad for p in ema) and all(p.requires_grad for p in followed)


def test_shared_ibot_head_option():
    model = build_meta_arch(load_config("smoke", TINY + ["objective.separate_ibot_head=false"]))
    assert model.student["ibot_head"] is model.student["dino_head"]
    assert model.teacher["ibot_head"] is model.teacher["dino_head"]


def test_param_groups_follow_official_rules():
    cfg = load_config("smoke", TINY)
    model = build_meta_arch(cfg)
    groups = param_groups(model.student, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    depth = len(model.student["backbone"].blocks)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.student.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)

    def group(name):
        return by_param[id(named[name])]

    assert group("backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.2 * 0.5 ** (depth + 1))
    assert group("backbone.cls_token")["lr_multiplier"] == pytest.approx(0.5 ** (depth + 1))
    assert group("backbone.blocks.0.attn.qkv.weight")["lr_multiplier"] == pytest.approx(0.5**depth)
    assert group(f"backbone.blocks.{depth - 1}.mlp.fc1.weight")["lr_multiplier"] == pytest.approx(0.5)
    assert group("backbone.norm.weight")["lr_multiplier"] == 1.0 and group("dino_head.mlp.0.weight")["lr_multiplier"] == 1.0
    for name in ("backbone.blocks.0.attn.qkv.bias", "backbone.blocks.0.norm1.weight", "backbone.blocks.0.ls1.gamma", "backbone.norm.bias"):
        assert group(name)["wd_multiplier"] == 0.0, name
    assert group("backbone.blocks.0.attn.qkv.weight")["wd_multiplier"] == 1.0
    assert group("dino_head.last_layer.weight_v")["is_last_layer"] and not group("dino_head.mlp.0.weight")["is_last_layer"]

    optimizer = torch.optim.AdamW(groups)
    apply_schedules(optimizer, lr=1.0, last_layer_lr=0.0, weight_decay=0.04)
    for g in optimizer.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else g["lr_multiplier"])
        assert g["weight_decay"] == 0.04 * g["wd_multiplier"]


def test_schedules_follow_recipe():
    cfg = load_config("vitl14")  # 500 epochs x 1250 steps, warmup 80 epochs, teacher temp warmup 30
    s = Schedules.from_config(cfg, total_batch_size=1024)
    epoch = 1250
    assert s.lr(0) == 0.0 and s.lr(80 * epoch - 1) == pytest.approx(2e-4)  # sqrt(1024/1024) = 1
    assert s.lr(cfg.total_steps - 1) == pytest.approx(1e-6, abs=1e-9)
    assert Schedules.from_config(cfg, total_batch_size=4096).lr(80 * epoch - 1) == pytest.approx(4e-4)
    assert s.teacher_temp(0) == pytest.approx(0.04) and s.teacher_temp(30 * epoch) == pytest.approx(0.07)
    assert s.teacher_temp(cfg.total_steps // 2) == pytest.approx(0.07)
    assert s.momentum(0) == pytest.approx(0.994) and s.momentum(cfg.total_steps) == 1.0
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(cfg.total_steps - 1) == pytest.approx(0.2, abs=1e-6)
    assert s.last_layer_lr(epoch - 1) == 0.0 and s.last_layer_lr(epoch) == s.lr(epoch)


def test_packed_and_per_crop_student_give_the_same_step():
    cfg = load_config("smoke", TINY + ["model.drop_path_rate=0.0"])
    torch.manual_seed(0)
    model = build_meta_arch(cfg).train()
    batch = tiny_batch(cfg)
    results = []
    for packed in (True, False):
        model.packed = packed
        model.zero_grad()
        loss, parts = model(*batch, teacher_temperature=0.05)
        loss.backward()
        grad = model.student["backbone"].blocks[0].attn.qkv.weight.grad.clone()
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-4)
