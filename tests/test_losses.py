import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import dinoforge.model.losses as losses
from dinoforge.model.heads import DINOHead
from dinoforge.model.losses import (SoftmaxCentering, dino_loss, dino_loss_fused, ibot_loss, ibot_loss_fused, koleo_loss,
                                   sinkhorn_knopp)


def reference_sinkhorn(logits: torch.Tensor, temperature: float, n_iterations: int) -> torch.Tensor:
    """Straightforward SwAV/DINOv2 Sinkhorn-Knopp in (K, B) layout, no max subtraction."""
    q = torch.exp(logits.double() / temperature).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t().float()


# ---------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_rows_sum_to_one():
    torch.manual_seed(0)
    targets = sinkhorn_knopp(torch.randn(16, 32), temperature=0.1, n_iterations=3)
    assert targets.shape == (16, 32)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(16), atol=1e-5, rtol=0)


def test_sinkhorn_converges_to_equal_prototype_mass():
    torch.manual_seed(0)
    b, k = 12, 6
    targets = sinkhorn_knopp(torch.randn(b, k), temperature=0.5, n_iterations=200)
    torch.testing.assert_close(targets.sum(dim=0), torch.full((k,), b / k), atol=1e-3, rtol=0)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_iterations", [1, 3, 10])
def test_sinkhorn_matches_reference(n_iterations):
    torch.manual_seed(1)
    logits = torch.randn(20, 50) * 3
    expected = reference_sinkhorn(logits, 0.2, n_iterations)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.2, n_iterations), expected, atol=1e-6, rtol=1e-5)


def test_sinkhorn_is_stable_for_huge_logits_over_temperature():
    torch.manual_seed(2)
    logits = torch.randn(8, 16)
    # logits / temperature ~ 1000: exp() would overflow fp32 without the max subtraction.
    shifted = sinkhorn_knopp(logits + 100.0, temperature=0.1)
    assert torch.isfinite(shifted).all()
    # A constant shift cancels in the normalisation, so the result equals the unshifted one.
    torch.testing.assert_close(shifted, sinkhorn_knopp(logits, temperature=0.1), atol=1e-4, rtol=1e-4)


def test_compiled_sinkhorn_agrees_with_eager_for_any_row_count():
    """Compiled, the passes recompute exp() from the logits (no stored fp32 matrix); the result
    is the eager one and the (dynamic) row count changes without recompiling."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(sinkhorn_knopp, dynamic=True)
    torch.manual_seed(5)
    for rows in (53, 71):
        logits = torch.randn(rows, 96).bfloat16()
        out = compiled(logits, 0.07, 3)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, sinkhorn_knopp(logits, 0.07, 3), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out, reference_sinkhorn(logits.float(), 0.07, 3), atol=1e-6, rtol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_sinkhorn_row_far_below_the_global_max_still_gets_a_distribution():
    # exp(-3000) underflows even in float64, so shifting every row by the global max alone would
    # zero this row and divide 0 by 0; each row is shifted by its own max instead.
    logits = torch.randn(6, 12)
    logits[2] -= 300.0
    out = sinkhorn_knopp(logits, temperature=0.1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(6))


def test_sinkhorn_rejects_zero_iterations():
    with pytest.raises(ValueError, match="n_iterations >= 1"):
        sinkhorn_knopp(torch.randn(4, 8), temperature=0.1, n_iterations=0)


def test_sinkhorn_bf16_input_is_computed_in_fp32():
    torch.manual_seed(3)
    logits = torch.randn(8, 16).bfloat16()
    out = sinkhorn_knopp(logits, 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_sinkhorn(logits.float(), 0.1, 3), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- centering


def test_centering_targets_sum_to_one_and_use_center():
    centering = SoftmaxCentering(4)
    assert centering.center.shape == (1, 4) and not centering.center.any()
    assert "center" in dict(centering.named_buffers())
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 8.0]])
    targets = centering.targets(logits, temperature=0.5)
    torch.testing.assert_close(targets.sum(dim=-1), torch.ones(2))
    torch.testing.assert_close(targets, F.softmax(logits / 0.5, dim=-1))

    centering.center.copy_(torch.tensor([[0.0, 0.0, 0.0, 8.0]]))
    # Subtracting the center turns the second row into uniform logits.
    torch.testing.assert_close(centering.targets(logits, 0.5)[1], torch.full((4,), 0.25))


def test_centering_ema_after_two_updates():
    centering = SoftmaxCentering(3, momentum=0.9)
    first = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # mean [2, 2, 2]
    second = torch.tensor([[10.0, 0.0, -10.0]])  # mean itself
    centering.update(first)
    torch.testing.assert_close(centering.center, torch.tensor([[0.2, 0.2, 0.2]]))
    centering.update(second)
    # 0.9 * 0.2 + 0.1 * [10, 0, -10]
    torch.testing.assert_close(centering.center, torch.tensor([[1.18, 0.18, -0.82]]))


# ---------------------------------------------------------------- across ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank, world_size, port, cases, logits, sk_expected, center_batches, center_expected):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for splits in cases:
            start = sum(splits[:rank])
            rows = slice(start, start + splits[rank])
            out = sinkhorn_knopp(logits[rows], temperature=0.1, n_iterations=3)
            assert out.shape == (splits[rank], logits.shape[1])
            torch.testing.assert_close(out, sk_expected[rows], atol=1e-6, rtol=0)

            centering = SoftmaxCentering(logits.shape[1])
            for batch in center_batches:
                centering.update(batch[rows])
            torch.testing.assert_close(centering.center, center_expected, atol=1e-6, rtol=0)
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_centering_across_ranks():
    torch.manual_seed(4)
    logits = torch.randn(8, 10) * 2
    sk_expected = sinkhorn_knopp(logits, temperature=0.1, n_iterations=3)

    center_batches = [torch.randn(8, 10), torch.randn(8, 10) + 1.0]
    single = SoftmaxCentering(10)
    for batch in center_batches:
        single.update(batch)

    # Rows per rank of the 8-row batch: unequal, then one rank empty. One spawn for both
    # because starting the processes dominates the runtime.
    cases = [(5, 3), (0, 8)]
    args = (2, _free_port(), cases, logits, sk_expected, center_batches, single.center)
    mp.spawn(_distributed_worker, args=args, nprocs=2, join=True)


# ---------------------------------------------------------------- DINO loss


def test_dino_loss_matches_explicit_pair_loop():
    torch.manual_seed(5)
    s, t, b, k, tau = 10, 2, 4, 7, 0.1
    student = torch.randn(s, b, k)
    teacher = F.softmax(torch.randn(t, b, k), dim=-1)
    terms = []
    for ti in range(t):
        for si in range(s):
            if si != ti:
                log_q = F.log_softmax(student[si] / tau, dim=-1)
                terms.append(-(teacher[ti] * log_q).sum(dim=-1).mean())
    assert len(terms) == 18
    torch.testing.assert_close(dino_loss(student, teacher, tau), torch.stack(terms).mean())


def test_dino_loss_two_globals_uses_only_cross_pairs():
    torch.manual_seed(6)
    student = torch.randn(2, 3, 5)
    teacher = F.softmax(torch.randn(2, 3, 5), dim=-1)

    def ce(p, s):
        return -(p * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    cross = (ce(teacher[0], student[1]) + ce(teacher[1], student[0])) / 2
    same = (ce(teacher[0], student[0]) + ce(teacher[1], student[1])) / 2
    torch.testing.assert_close(dino_loss(student, teacher), cross)
    # Swapping the teacher views turns the cross pairs into the (excluded) same-view pairs.
    torch.testing.assert_close(dino_loss(student, teacher.flip(0)), same)
    assert not torch.isclose(cross, same)


def test_dino_loss_hand_computed_tiny_case():
    # tau = 1: softmax([0, 0]) = [1/2, 1/2], softmax([log 3, 0]) = [3/4, 1/4].
    student = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    # (t0, s1): -log(3/4);  (t1, s0): -(0.5 log 1/2 + 0.5 log 1/2) = log 2.
    expected = (math.log(4 / 3) + math.log(2.0)) / 2
    assert dino_loss(student, teacher, student_temperature=1.0).item() == pytest.approx(expected, abs=1e-6)


def test_dino_loss_gradient_and_shape_checks():
    student = torch.randn(3, 2, 4, requires_grad=True)
    dino_loss(student, F.softmax(torch.randn(2, 2, 4), -1)).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    with pytest.raises(ValueError):
        dino_loss(torch.randn(2, 2, 4), torch.rand(3, 2, 4))
    with pytest.raises(ValueError):
        dino_loss(torch.randn(1, 2, 4), torch.rand(1, 2, 4))


# ---------------------------------------------------------------- iBOT loss


def test_ibot_loss_weights_each_image_equally():
    masks = torch.tensor(
        [
            [True, False, False, False],  # 1 masked patch
            [False, True, True, True],  # 3 masked patches
            [False, False, False, False],  # unmasked, still counted in N_img
        ]
    )
    # tau = 1 and uniform student logits: every token's cross-entropy is log K = log 2.
    # Image 0's single token: log 2 with weight 1. Image 1: teacher one-hot on student
    # softmax([log 3, 0]) -> -log(3/4) per token, 3 tokens with weight 1/3 each.
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    teacher = torch.tensor([[0.3, 0.7], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    expected = (math.log(2.0) + math.log(4 / 3)) / 3
    loss = ibot_loss(student, teacher, masks, student_temperature=1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_ibot_loss_matches_per_image_loop_in_mask_order():
    torch.manual_seed(7)
    masks = torch.rand(4, 9) < 0.4
    masks[2] = False
    m = int(masks.sum())
    student, teacher = torch.randn(m, 6), F.softmax(torch.randn(m, 6), -1)
    owner = masks.nonzero()[:, 0]  # image index of each token, row-major order
    expected = 0.0
    for image in range(4):
        tokens = owner == image
        if tokens.any():
            ce = -(teacher[tokens] * F.log_softmax(student[tokens] / 0.1, -1)).sum(-1)
            expected = expected + ce.mean()
    torch.testing.assert_close(ibot_loss(student, teacher, masks), expected / 4)
    with pytest.raises(ValueError):
        ibot_loss(student[:-1], teacher[:-1], masks)


def test_compiled_ibot_loss_is_one_graph_and_matches_eager():
    """No host sync inside: the owner image of each masked row comes from a sorted search, not
    from a boolean index or a read of the masked count, so the compiled loss is one graph."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(8)
    compiled = torch.compile(ibot_loss, dynamic=True)
    for _ in range(2):
        masks = torch.rand(6, 16) < 0.3
        masks[1] = False
        m = int(masks.sum())
        student, teacher = torch.randn(m, 10, requires_grad=True), F.softmax(torch.randn(m, 10), -1)
        got = compiled(student, teacher, masks)
        (grad,) = torch.autograd.grad(got, student)
        want = ibot_loss(student, teacher, masks)
        (want_grad,) = torch.autograd.grad(want, student)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, want_grad)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


# ---------------------------------------------------------------- fused prototype layer + loss


def _reference_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, tau: float) -> torch.Tensor:
    """float64 weighted cross-entropy, written out independently of losses.py."""
    return -(weights * (targets * F.log_softmax(logits / tau, dim=-1)).sum(-1)).sum()


@pytest.mark.parametrize("chunk_elements", [2**24, 40])  # one chunk; several chunks with a ragged last one
def test_fused_dino_loss_matches_head_then_loss_in_float64(monkeypatch, chunk_elements):
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(11)
    s, t, b, k, tau = 6, 2, 3, 13, 0.1
    head = DINOHead(5, k, hidden_dim=8, bottleneck_dim=4).double()
    tokens = torch.randn(s * b, 5, dtype=torch.float64)
    teacher = F.softmax(torch.randn(t, b, k, dtype=torch.float64), dim=-1)

    def gradients(loss_fn):
        head.zero_grad()
        x = tokens.clone().requires_grad_(True)
        loss = loss_fn(x)
        loss.backward()
        return loss.detach(), [x.grad] + [p.grad.clone() for p in head.parameters()]

    # Reference: the explicit (t, s != t) pair mean over materialised logits.
    def reference(x):
        logits = head(x).view(s, b, k)
        pairs = [_reference_ce(logits[si], teacher[ti], torch.full((b,), 1.0 / b, dtype=torch.float64), tau)
                 for ti in range(t) for si in range(s) if si != ti]
        return torch.stack(pairs).mean()

    fused_value, fused_grads = gradients(
        lambda x: dino_loss_fused(head.features(x).view(s, b, -1), head.last_layer.prototypes(), teacher, tau))
    ref_value, ref_grads = gradients(reference)
    torch.testing.assert_close(fused_value, ref_value, rtol=1e-12, atol=0)
    assert len(ref_grads) == 1 + len(list(head.parameters()))
    for fused, ref in zip(fused_grads, ref_grads):
        assert ref.abs().max() > 0
        torch.testing.assert_close(fused, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_elements", [2**24, 30])
def test_fused_ibot_loss_matches_head_then_loss_in_float64(monkeypatch, chunk_elements):
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(12)
    masks = torch.rand(5, 8) < 0.4
    masks[1] = False
    m, k, tau = int(masks.sum()), 11, 0.07
    head = DINOHead(6, k, hidden_dim=8, bottleneck_dim=4).double()
    tokens = torch.randn(m, 6, dtype=torch.float64, requires_grad=True)
    teacher = F.softmax(torch.randn(m, k, dtype=torch.float64), dim=-1)
    fused = ibot_loss_fused(head.features(tokens), head.last_layer.prototypes(), teacher, masks, tau)
    fused_grads = torch.autograd.grad(fused, [tokens, *head.parameters()])
    per_image = masks.sum(-1).clamp(min=1).double()[:, None].expand_as(masks)[masks]
    ref = _reference_ce(head(tokens), teacher, 1.0 / (per_image * masks.shape[0]), tau)
    ref_grads = torch.autograd.grad(ref, [tokens, *head.parameters()])
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=0)
    for a, r in zip(fused_grads, ref_grads):
        assert r.abs().max() > 0
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="masked patches"):
        ibot_loss_fused(head.features(tokens[:-1]), head.last_layer.prototypes(), teacher[:-1], masks, tau)


def test_fused_loss_under_bf16_autocast_matches_the_unfused_path():
    """Under autocast both paths score bf16 features against bf16 prototypes with the softmax in
    fp32; the results agree to bf16 rounding of the logits."""
    torch.manual_seed(13)
    s, t, b, k = 4, 2, 8, 257
    head = DINOHead(16, k, hidden_dim=32, bottleneck_dim=8)
    tokens = torch.randn(s * b, 16)
    teacher = F.softmax(torch.randn(t, b, k) / 0.05, dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unfused = dino_loss(head(tokens).view(s, b, k), teacher)
        fused = dino_loss_fused(head.features(tokens).view(s, b, -1), head.last_layer.prototypes(), teacher)
    assert fused.dtype == unfused.dtype == torch.float32
    torch.testing.assert_close(fused, unfused, rtol=2e-3, atol=0)
    grads = [torch.autograd.grad(v, head.last_layer.weight_v)[0] for v in (unfused, fused)]
    assert F.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0) > 0.999


# ---------------------------------------------------------------- KoLeo


def test_koleo_three_points_on_circle():
    points = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # Every point's nearest neighbour is at distance sqrt(2) (0°/180° both pick 90°).
    assert koleo_loss(points).item() == pytest.approx(-math.log(math.sqrt(2.0)), abs=1e-6)


def test_koleo_is_scale_invariant():
    torch.manual_seed(8)
    x = torch.randn(16, 8)
    scales = torch.rand(16, 1) * 100 + 0.01  # per-row scales, all removed by normalisation
    torch.testing.assert_close(koleo_loss(x * scales), koleo_loss(x), atol=1e-6, rtol=1e-6)


def test_koleo_antipodal_pair_never_picks_itself():
    points = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert koleo_loss(points).item() == pytest.approx(-math.log(2.0), abs=1e-6)


def test_koleo_duplicate_point_dominates():
    eps = 1e-8
    points = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], requires_grad=True)  # rows 0, 1 coincide
    loss = koleo_loss(points, eps=eps)
    expected = (2 * -math.log(eps) - math.log(math.sqrt(2.0))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() > 12.0
    loss.backward()
    assert torch.isfinite(points.grad).all()
