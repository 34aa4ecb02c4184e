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
    The global max, prototype sums and B_total are all-reduced, so N ranks holding disjoint slices of
    a batch (of any sizes, including empty) give exactly the single-process result on the batch.
    """
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    with torch.autocast(teacher_logits.device.type, enabled=False):  # the matrix-vector products stay fp32
        scaled = teacher_logits.float() / temperature
        n_samples, n_prototypes = scaled.shape
        # The matrix is stored once, each row shifted by its own max (exp() <= 1, and no row
        # underflows to zeros), and read by matrix-vector products only: in the compiled step the
        # shift, exp() and the store are one pass over the (bf16) logits. The iterate is
        # q_ij * exp(m_i - m) * sample_scale_i * prototype_scale_j for the global max m, so the
        # per-row shifts fold into the starting sample scales. (The official code shifts by
        # nothing and overflows fp32 once logits/temperature > 88.)
        row_max = scaled.amax(dim=1, keepdim=True) if n_prototypes else scaled.new_zeros((n_samples, 1))
        q = torch.exp(scaled - row_max)
        del scaled
        local_max = row_max.max() if n_samples else row_max.new_tensor(float("-inf"))
        global_max = _all_reduce(local_max.reshape(1), dist.ReduceOp.MAX)
        b_total = _all_reduce(row_max.new_tensor([float(n_samples)]))  # ranks may hold different B
        sample_scale = torch.exp(row_max - global_max)
        # SwAV starts from total mass 1; that only scales the first iterate and cancels below.
        for _ in range(n_iterations):
            # Each prototype (column here) gets total weight 1/K, summed over all ranks' samples:
            # prototype_scale_j = 1 / (K * sum_i q_ij sample_scale_i).
            prototype_scale = 1.0 / (_all_reduce(sample_scale.t() @ q) * n_prototypes)
            # Each sample gets total weight 1/B_total; samples are rank-local, so no reduction.
            sample_scale = 1.0 / ((q @ prototype_scale.t()) * b_total)

        # rows sum to 1: a soft assignment per sample
        return q.mul_(sample_scale * b_total).mul_(prototype_scale)


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


def _dino_pairs(n_student: int, batch: int, n_prototypes: int, teacher_probs: Tensor) -> int:
    n_teacher = teacher_probs.shape[0]
    if teacher_probs.shape != (n_teacher, batch, n_prototypes) or n_teacher > n_student:
        raise ValueError(
            f"teacher_probs {tuple(teacher_probs.shape)} must be (T, B, K) with T <= S for "
            f"{n_student} student crops of batch {batch} and {n_prototypes} prototypes"
        )
    n_pairs = n_teacher * n_student - n_teacher
    if n_pairs == 0:
        raise ValueError("dino_loss needs at least one (teacher, student) pair with different crops")
    return n_pairs


def dino_loss(student_logits: Tensor, teacher_probs: Tensor, student_temperature: float = 0.1) -> Tensor:
    """Image-level DINO loss (DINOv2 §3) over all (teacher crop t, student crop s) pairs with s != t.

    student_logits (S, B, K): the first T crops are the teacher's T views; teacher_probs (T, B, K).
    Each pair contributes the batch-mean cross-entropy -sum_k p_t log softmax(s / τ); pairs are
    averaged, which matches the official division by n_global_loss_terms + n_local_loss_terms.
    """
    n_student, batch, n_prototypes = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    n_pairs = _dino_pairs(n_student, batch, n_prototypes, teacher_probs)
    student_log_probs = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    # cross_entropy[t, s] = -(1/B) sum_{b,k} p[t,b,k] log q[s,b,k]. Autocast would run this
    # contraction over K in bf16/fp16 (einsum is a matmul), so it is kept out of autocast.
    with torch.autocast(student_logits.device.type, enabled=False):
        cross_entropy = -torch.einsum("tbk,sbk->ts", teacher_probs.float(), student_log_probs) / batch
    same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=cross_entropy.device)
    return cross_entropy.masked_fill(same_view, 0.0).sum() / n_pairs


def _ibot_token_weights(n_rows: int, teacher_probs: Tensor, masks: Tensor) -> Tensor:
    """(M,) weight of each masked patch: 1 / (its image's masked count * N_img).

    The owner image of masked row r is found by a sorted search of r in the running masked
    counts, so M comes from the tensors' shapes and nothing waits for the device (a boolean
    index or ``int(masks.sum())`` would block the host until the GPU caught up, and break a
    compiled graph in two). The consistency check with the masks does read the count, so it
    runs in eager mode only.
    """
    masks = masks.bool()
    if teacher_probs.shape[0] != n_rows:
        raise ValueError(f"{n_rows} student rows and teacher_probs {tuple(teacher_probs.shape)} differ in M")
    counts = masks.sum(dim=-1)
    if not torch.compiler.is_compiling() and int(counts.sum()) != n_rows:
        raise ValueError(f"{n_rows} rows given for M = {int(counts.sum())} masked patches")
    owner = torch.searchsorted(counts.cumsum(0), torch.arange(n_rows, device=masks.device), right=True)
    dtype = torch.promote_types(teacher_probs.dtype, torch.float32)
    return 1.0 / (counts.clamp(min=1).to(dtype)[owner] * masks.shape[0])  # row-major mask order


def ibot_loss(
    student_logits: Tensor, teacher_probs: Tensor, masks: Tensor, student_temperature: float = 0.1
) -> Tensor:
    """Masked-patch iBOT loss (DINOv2 §3; official iBOTPatchLoss.forward_masked).

    student_logits / teacher_probs (M, K) hold the masked patches in masks.flatten().nonzero()
    order, masks (N_img, P) bool. Each image's masked patches share weight 1 (so heavily masked
    images do not dominate), and the sum is divided by N_img, counting unmasked images too.
    """
    if teacher_probs.shape != student_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_probs {tuple(teacher_probs.shape)} differ")
    token_weight = _ibot_token_weights(student_logits.shape[0], teacher_probs, masks)
    student_log_probs = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    cross_entropy = -(teacher_probs.float() * student_log_probs).sum(dim=-1)  # (M,)
    return (cross_entropy * token_weight).sum()


# Logits per chunk in the fused loss: 256 MiB in fp32 (1,024 rows of 65,536 prototypes).
_CHUNK_ELEMENTS = 2**26


class _PrototypeCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(targets_i, softmax(features_i @ prototypes^T / τ)) in row chunks: the
    (M, K) logits exist one chunk at a time and are recomputed in backward (one more
    (M, d) x (d, K) matmul) instead of being stored with their fp32 log-softmax."""

    @staticmethod
    def forward(ctx, features: Tensor, prototypes: Tensor, targets: Tensor, weights: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(features, prototypes, targets, weights)
        ctx.temperature = temperature
        total = weights.new_zeros(())
        for rows in _chunks(features.shape[0], prototypes.shape[0]):
            logits, target = _chunk(features, prototypes, targets, rows, weights.dtype, temperature)
            per_row = torch.logsumexp(logits, dim=-1) * target.sum(dim=-1) - (target * logits).sum(dim=-1)
            total += (per_row * weights[rows]).sum()
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        features, prototypes, targets, weights = ctx.saved_tensors
        grad_features = torch.empty_like(features)
        grad_prototypes = torch.zeros(prototypes.shape, dtype=weights.dtype, device=prototypes.device)
        for rows in _chunks(features.shape[0], prototypes.shape[0]):
            logits, target = _chunk(features, prototypes, targets, rows, weights.dtype, ctx.temperature)
            # d/dlogits of lse * sum(t) - t . logits = softmax * sum(t) - t, then the 1/τ and w_i.
            grad_logits = torch.softmax(logits, dim=-1) * target.sum(dim=-1, keepdim=True) - target
            grad_logits *= (grad_total * weights[rows] / ctx.temperature)[:, None]
            grad_logits = grad_logits.to(features.dtype)
            grad_features[rows] = grad_logits @ prototypes
            grad_prototypes += grad_logits.t() @ features[rows]
        return grad_features, grad_prototypes.to(prototypes.dtype), None, None, None


def _chunk(features: Tensor, prototypes: Tensor, targets: Tensor, rows: slice, dtype: torch.dtype,
           temperature: float) -> tuple[Tensor, Tensor]:
    """One chunk's logits / τ and targets in the accumulation dtype (forward and backward alike)."""
    return (features[rows] @ prototypes.t()).to(dtype) / temperature, targets[rows].to(dtype)


def _chunks(n_rows: int, n_prototypes: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // n_prototypes)
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def prototype_cross_entropy(features: Tensor, prototypes: Tensor, targets: Tensor, weights: Tensor,
                            temperature: float) -> Tensor:
    """Fused prototype layer + weighted cross-entropy: features (M, d) (the head's normalised
    bottleneck), prototypes (K, d), targets (M, K) teacher probabilities, weights (M,). The
    softmax and sums run in fp32 (float64 stays float64), like ``dino_loss``/``ibot_loss``."""
    device_type = features.device.type
    # The matmuls run in the autocast dtype when autocast is on, as F.linear would; the
    # function itself runs with autocast off so that its backward uses the same dtypes.
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else features.dtype
    with torch.autocast(device_type, enabled=False):
        accumulate = torch.promote_types(features.dtype, torch.float32)
        return _PrototypeCrossEntropy.apply(features.to(dtype), prototypes.to(dtype), targets, weights.to(accumulate),
                                            temperature)


def dino_loss_fused(student_features: Tensor, prototypes: Tensor, teacher_probs: Tensor,
                    student_temperature: float = 0.1) -> Tensor:
    """``dino_loss`` with the student's prototype layer fused in: student_features (S, B, d).
    Cross-entropy is linear in the target, so each student crop s is scored once against the
    sum of the teacher distributions of the other views (t != s)."""
    n_student, batch, _ = student_features.shape
    n_teacher = teacher_probs.shape[0]
    n_pairs = _dino_pairs(n_student, batch, prototypes.shape[0], teacher_probs)
    teacher = teacher_probs.to(torch.promote_types(teacher_probs.dtype, torch.float32))
    everyone = teacher.sum(dim=0)
    targets = torch.stack([everyone - teacher[s] if s < n_teacher else everyone for s in range(n_student)])
    weights = teacher.new_full((n_student * batch,), 1.0 / (batch * n_pairs))
    return prototype_cross_entropy(student_features.flatten(0, 1), prototypes, targets.flatten(0, 1), weights,
                                   student_temperature)


def ibot_loss_fused(student_features: Tensor, prototypes: Tensor, teacher_probs: Tensor, masks: Tensor,
                    student_temperature: float = 0.1) -> Tensor:
    """``ibot_loss`` with the student's prototype layer fused in: student_features (M, d)."""
    token_weight = _ibot_token_weights(student_features.shape[0], teacher_probs, masks)
    return prototype_cross_entropy(student_features, prototypes, teacher_probs, token_weight, student_temperature)


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
