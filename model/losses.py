"""DINOv2 training objectives (arXiv 2304.07193, §3): DINO image-level loss, iBOT masked-patch loss,
KoLeo regulariser, and the two ways of turning teacher logits into targets (centering, Sinkhorn-Knopp).

All maths is done in fp32 (inputs are cast with ``.float()``): the softmaxes at temperatures of
0.04-0.1 and the Sinkhorn iterations lose too much precision in bf16/fp16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce across ranks; the identity in a single process."""
    if _distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temperature: float, n_iterations: int = 3) -> Tensor:
    """(B, K) logits of this rank -> (B, K) targets whose rows each sum to 1.

    Sinkhorn-Knopp centering (SwAV; DINOv2 §3): alternately rescale so that every prototype gets
    mass 1/K and every sample mass 1/B_total, then scale samples back to probability rows.
    The matrix is kept in (B, K) layout, so SwAV's "rows" (prototypes) are dim 0 sums here.
    Prototype sums, total mass and B_total are all-reduced, so N ranks holding disjoint slices of
    a batch (of any sizes, including empty) give exactly the single-process result on the batch.
    """
    scaled = teacher_logits.float() / temperature
    # Subtracting the global max cancels in the first normalisation but keeps exp() <= 1;
    # the official code skips it and overflows fp32 once logits/temperature > 88. (Underflow remains:
    # a sample whose logits all sit more than ~87 * temperature below the global max gets a zero row.)
    local_max = scaled.max() if scaled.numel() else scaled.new_tensor(float("-inf"))
    global_max = _all_reduce(local_max.reshape(1), dist.ReduceOp.MAX)
    q = torch.exp(scaled - global_max)

    n_samples, n_prototypes = q.shape
    # One collective for both scalars: total mass and B_total (ranks may hold different B).
    mass_and_count = _all_reduce(torch.stack([q.sum(), q.new_tensor(float(n_samples))]))
    total_mass, b_total = mass_and_count[0], mass_and_count[1]
    # SwAV's transport polytope: total mass 1, prototype mass 1/K, sample mass 1/B_total. The
    # scalar factors cancel in the following normalisation, so they only fix intermediate scales.
    q /= total_mass

    for _ in range(n_iterations):
        # Each prototype (column here) gets total weight 1/K, summed over all ranks' samples.
        prototype_sums = _all_reduce(q.sum(dim=0, keepdim=True))
        q /= prototype_sums
        q /= n_prototypes
        # Each sample gets total weight 1/B_total; samples are rank-local, so no reduction.
        q /= q.sum(dim=1, keepdim=True)
        q /= b_total

    return q * b_total  # rows sum to 1: a soft assignment per sample


class SoftmaxCentering(nn.Module):
    """DINO's centering (DINO §3.1): targets softmax((t - c) / temperature), where the center c is
    an EMA of the batch-mean teacher logits, averaged over all ranks' samples."""

    center: Tensor

    def __init__(self, n_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def targets(self, logits: Tensor, temperature: float) -> Tensor:
        return F.softmax((logits.float() - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, logits: Tensor) -> None:
        """Fold the mean of ``logits`` (..., K) over all ranks into the center. Call after targets()."""
        flat = logits.float().reshape(-1, self.center.shape[-1])
        # Sum and count reduced together so ranks with different batch sizes weight samples equally
        # (the official code divides by local B * world_size, assuming equal B).
        sum_and_count = torch.cat([flat.sum(dim=0), flat.new_tensor([float(flat.shape[0])])])
        _all_reduce(sum_and_count)
        batch_mean = sum_and_count[:-1] / sum_and_count[-1]
        self.center.mul_(self.momentum).add_(batch_mean, alpha=1.0 - self.momentum)


def dino_loss(student_logits: Tensor, teacher_probs: Tensor, student_temperature: float = 0.1) -> Tensor:
    """Image-level DINO loss (DINOv2 §3) over all (teacher crop t, student crop s) pairs with s != t.

    student_logits (S, B, K): the first T crops are the teacher's T views; teacher_probs (T, B, K).
    Each pair contributes the batch-mean cross-entropy -sum_k p_t log softmax(s / τ); pairs are
    averaged, which matches the official division by n_global_loss_terms + n_local_loss_terms.
    """
    n_student, batch, n_prototypes = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    if teacher_probs.shape != (n_teacher, batch, n_prototypes) or n_teacher > n_student:
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} must be (T, B, K) with T <= S for "
            f"student_logits {tuple(student_logits.shape)}"
        )
    n_pairs = n_teacher * n_student - n_teacher
    if n_pairs == 0:
        raise ValueError("dino_loss needs at least one (teacher, student) pair with different crops")

    student_log_probs = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    # cross_entropy[t, s] = -(1/B) sum_{b,k} p[t,b,k] log q[s,b,k]
    cross_entropy = -torch.einsum("tbk,sbk->ts", teacher_probs.float(), student_log_probs) / batch
    same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=cross_entropy.device)
    return cross_entropy.masked_fill(same_view, 0.0).sum() / n_pairs


def ibot_loss(
    student_logits: Tensor, teacher_probs: Tensor, masks: Tensor, student_temperature: float = 0.1
) -> Tensor:
    """Masked-patch iBOT loss (DINOv2 §3; official iBOTPatchLoss.forward_masked).

    student_logits / teacher_probs (M, K) hold the masked patches in masks.flatten().nonzero()
    order, masks (N_img, P) bool. Each image's masked patches share weight 1 (so heavily masked
    images do not dominate), and the sum is divided by N_img, counting unmasked images too.
    """
    masks = masks.bool()
    n_masked = int(masks.sum())
    if student_logits.shape[0] != n_masked or teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_probs {tuple(teacher_probs.shape)} "
            f"must both be (M, K) with M = {n_masked} masked patches"
        )
    per_image_weight = 1.0 / masks.sum(dim=-1).clamp(min=1).float()
    token_weight = per_image_weight[:, None].expand_as(masks)[masks]  # (M,), row-major mask order

    student_log_probs = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    cross_entropy = -(teacher_probs.float() * student_log_probs).sum(dim=-1)  # (M,)
    return (cross_entropy * token_weight).sum() / masks.shape[0]


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy regulariser (DINOv2 §3; Sablayrolles et al. 2019):
    -mean_i log(||x_i - x_nn(i)|| + eps) on L2-normalised rows. Per-rank, like the official code."""
    x = F.normalize(features.float(), p=2, dim=-1)
    with torch.no_grad():
        similarity = x @ x.t()
        # -inf (not the official -1) so a row can never pick itself, even against antipodal points.
        similarity.fill_diagonal_(float("-inf"))
        nearest = similarity.argmax(dim=1)
    distances = torch.linalg.vector_norm(x - x[nearest], dim=-1)
    return -torch.log(distances + eps).mean()
