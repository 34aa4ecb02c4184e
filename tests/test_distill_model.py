import math

import pytest
import torch
import torch.nn.functional as F

from dinoforge.model.distill import DistillMetaArch, random_frozen_heads
from dinoforge.model.heads import DINOHead
from dinoforge.model.losses import dino_loss, ibot_loss, sinkhorn_knopp
from dinoforge.model.objective import HeadConfig, ObjectiveConfig
from dinoforge.training.ema import update_ema
from dinoforge.model import DinoVisionTransformer, build_backbone

K = 64
HEAD = HeadConfig(n_prototypes=K, hidden_dim=32, bottleneck_dim=16)
CFG = ObjectiveConfig(dino_head=HEAD, ibot_head=HEAD)
TEACHER_DIM = 192
BATCH, N_LOCAL, GRID = 2, 2, (16 // 4) ** 2
TEMP = 0.05


def student_backbone(drop_path_rate=0.0):
    return build_backbone("vit_nano", patch_size=4, img_size=16, drop_path_rate=drop_path_rate)


def teacher_backbone():
    return DinoVisionTransformer(img_size=16, patch_size=4, embed_dim=TEACHER_DIM, depth=3, num_heads=3)


def teacher_heads(n_prototypes=K):
    return (DINOHead(TEACHER_DIM, n_prototypes, HEAD.hidden_dim, HEAD.bottleneck_dim),
            DINOHead(TEACHER_DIM, n_prototypes, HEAD.hidden_dim, HEAD.bottleneck_dim))


def make_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return DistillMetaArch(student_backbone(), teacher_backbone(), *teacher_heads(), cfg).train()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * BATCH, 3, 16, 16, generator=g), torch.randn(N_LOCAL * BATCH, 3, 8, 8, generator=g)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, and on a
    busy machine it slows each step down many times over. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared_model(one_thread):
    """For tests that only run forward (Sinkhorn-Knopp centering keeps no state)."""
    return make_model()


def no_masks():
    return torch.zeros(2 * BATCH, GRID, dtype=torch.bool)


def test_frozen_teacher_trained_student_and_spare_ema():
    model = make_model()
    assert not model.teacher.training and not model.ema.training and model.student.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert not any(p.requires_grad for p in model.ema.parameters())
    for s, e in zip(model.student.parameters(), model.ema.parameters()):
        assert torch.equal(s, e) and s is not e
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}

    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-3)
    loss, parts = model(*batch(), no_masks(), TEMP)
    loss.backward()
    assert set(parts) == {"dino_loss", "ibot_loss", "koleo_loss"} and math.isfinite(loss.item())
    assert all(not p.requires_grad for p in parts.values())
    torch.testing.assert_close(loss.detach(), parts["dino_loss"] + parts["ibot_loss"] + 0.1 * parts["koleo_loss"])
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is None for p in model.ema.parameters())
    assert model.student["backbone"].blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.student["ibot_head"].mlp[0].weight.grad.abs().sum() > 0
    assert model.student["dino_head"].mlp[0].weight.grad.abs().sum() > 0
    optimizer.step()

    ema_before = [e.clone() for e in model.ema.parameters()]
    update_ema(model, 0.9)
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    changed = [k for k, v in model.student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert "backbone.blocks.0.attn.qkv.weight" in changed and "ibot_head.last_layer.weight_v" in changed
    for old, new, s in zip(ema_before, model.ema.parameters(), model.student.parameters()):
        torch.testing.assert_close(new, old + 0.1 * (s - old))
    # one tensor by name: it moved 10% of the way toward the student
    name = "backbone.blocks.0.attn.qkv.weight"
    old = dict(zip([n for n, _ in model.ema.named_parameters()], ema_before))[name]
    new, s = model.ema.get_parameter(name), model.student.get_parameter(name)
    assert not torch.equal(new, old)
    torch.testing.assert_close(new - old, 0.1 * (s - old))

    model.train()
    assert not model.teacher.training and not model.ema.training
    assert not model.teacher["backbone"].blocks[0].training


def test_masks_are_ignored(shared_model):
    model = shared_model
    random_masks = torch.rand(2 * BATCH, GRID, generator=torch.Generator().manual_seed(1)) < 0.5
    loss_a, parts_a = model(*batch(), no_masks(), TEMP)
    loss_b, parts_b = model(*batch(), random_masks, TEMP)
    assert torch.equal(loss_a, loss_b)
    for name in parts_a:
        assert torch.equal(parts_a[name], parts_b[name]), name


def _by_hand(model, global_crops, local_crops):
    """Teacher targets and student logits recomputed from the modules."""
    with torch.no_grad():
        t = model.teacher["backbone"].forward_features(global_crops)
        cls_targets = sinkhorn_knopp(model.teacher["dino_head"](t["x_norm_clstoken"]), TEMP, CFG.sinkhorn_iterations)
        patch_targets = sinkhorn_knopp(
            model.teacher["ibot_head"](t["x_norm_patchtokens"].reshape(-1, TEACHER_DIM)), TEMP, CFG.sinkhorn_iterations
        )
    s_global, s_local = model.student["backbone"].forward_features([global_crops, local_crops])
    cls_logits = model.student["dino_head"](torch.cat([s_global["x_norm_clstoken"], s_local["x_norm_clstoken"]]))
    patch_logits = model.student["ibot_head"](s_global["x_norm_patchtokens"].reshape(-1, 128))
    return cls_targets, patch_targets, cls_logits, patch_logits


def test_ibot_part_covers_every_global_patch(shared_model):
    model = shared_model
    global_crops, local_crops = batch()
    _, parts = model(global_crops, local_crops, no_masks(), TEMP)
    _, patch_targets, _, patch_logits = _by_hand(model, global_crops, local_crops)
    assert patch_targets.shape == (2 * BATCH * GRID, K)
    expected = ibot_loss(patch_logits, patch_targets, torch.ones(2 * BATCH, GRID, dtype=torch.bool), CFG.student_temperature)
    torch.testing.assert_close(parts["ibot_loss"], expected.detach())
    # equal patch counts per image: the all-True iBOT loss is the plain mean cross-entropy
    plain = -(patch_targets * F.log_softmax(patch_logits / CFG.student_temperature, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(parts["ibot_loss"], plain.detach())


def test_dino_part_follows_ssl_convention(shared_model):
    model = shared_model
    global_crops, local_crops = batch()
    _, parts = model(global_crops, local_crops, no_masks(), TEMP)
    cls_targets, _, cls_logits, _ = _by_hand(model, global_crops, local_crops)
    expected = dino_loss(cls_logits.view(-1, BATCH, K), cls_targets.view(2, BATCH, K), CFG.student_temperature)
    torch.testing.assert_close(parts["dino_loss"], expected.detach())
    # explicitly: every (teacher global view t, student crop s != t) pair, batch-mean CE, pairs averaged
    log_q = F.log_softmax(cls_logits / CFG.student_temperature, dim=-1).view(-1, BATCH, K)
    p = cls_targets.view(2, BATCH, K)
    pairs = [-(p[t] * log_q[s]).sum(-1).mean() for t in range(2) for s in range(2 + N_LOCAL) if s != t]
    assert len(pairs) == 2 * (2 + N_LOCAL) - 2
    torch.testing.assert_close(parts["dino_loss"], (sum(pairs) / len(pairs)).detach())


def test_softmax_centering_and_no_local_crops():
    cfg = ObjectiveConfig(dino_head=HEAD, ibot_head=HEAD, centering="softmax")
    model = make_model(cfg)
    assert model.dino_center.center.shape == (1, K) and model.ibot_center.center.shape == (1, K)
    global_crops, _ = batch()
    loss, parts = model(global_crops, None, no_masks(), TEMP)  # only the 2 global crops: 2 DINO pairs
    loss.backward()
    assert math.isfinite(loss.item()) and parts["dino_loss"] > 0
    assert model.dino_center.center.abs().sum() > 0 and model.ibot_center.center.abs().sum() > 0


def test_rejects_stochastic_depth_and_mismatched_prototypes():
    with pytest.raises(ValueError, match="drop_path_rate"):
        DistillMetaArch(student_backbone(0.1), teacher_backbone(), *teacher_heads(), CFG)
    with pytest.raises(ValueError) as excinfo:
        DistillMetaArch(student_backbone(), teacher_backbone(), *teacher_heads(n_prototypes=32), CFG)
    assert "64" in str(excinfo.value) and "32" in str(excinfo.value)


def test_sharding_and_the_ema_see_the_spare_ema_through_the_interface():
    model = make_model()
    modules = [unit.module for unit in model.shard_units()]
    for branch in (model.student, model.teacher, model.ema):  # the spare EMA is sharded like the student
        assert modules.index(branch["backbone"].blocks[0]) < modules.index(branch["backbone"])
    assert {id(p) for module in modules for p in module.parameters()} == {id(p) for p in model.parameters()}
    ema, followed = model.ema_pairs()
    assert ema == list(model.ema.parameters()) and followed == list(model.student.parameters())
    assert model.released_branch == "ema" and model.student_modules() == list(model.student.values())


def test_random_frozen_heads_are_seeded():
    rng_before = torch.get_rng_state()
    dino_a, ibot_a = random_frozen_heads(TEACHER_DIM, CFG, seed=3)
    dino_b, ibot_b = random_frozen_heads(TEACHER_DIM, CFG, seed=3)
    dino_c, _ = random_frozen_heads(TEACHER_DIM, CFG, seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    for a, b in ((dino_a, dino_b), (ibot_a, ibot_b)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(dino_a.mlp[0].weight, dino_c.mlp[0].weight)
    assert not torch.equal(dino_a.mlp[0].weight, ibot_a.mlp[0].weight)  # separate heads
    assert not any(p.requires_grad for p in (*dino_a.parameters(), *ibot_a.parameters()))
    model = DistillMetaArch(student_backbone(), teacher_backbone(), dino_a, ibot_a, CFG)
    loss, _ = model(*batch(), no_masks(), TEMP)
    assert math.isfinite(loss.item())


def test_student_fits_fixed_teacher_targets():
    model = make_model()
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-3, weight_decay=0.0)
    data = batch()
    losses, ibot = [], []
    for _ in range(21):  # 20 AdamW steps
        loss, parts = model(*data, no_masks(), TEMP)
        losses.append(loss.item())
        ibot.append(parts["ibot_loss"].item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_ema(model, 0.9)
    assert losses[-1] < losses[0] - 1.0, losses
    assert ibot[-1] < ibot[0] - 0.2, ibot
