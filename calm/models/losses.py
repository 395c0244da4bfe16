"""Energy loss for CALM's generative head (paper §4.2, Eqs. 9-10).

The head only produces samples, so it is trained with the energy score, a strictly proper scoring
rule (for 0 < alpha < 2) that needs nothing but samples:

    S(P, y) = E ||x' - x''||^alpha - 2 E ||x - y||^alpha,      x, x', x'' ~ P.

Per position i, with N head samples x_1..N and M target samples z_1..M (drawn from the frozen
autoencoder posterior of chunk i), the unbiased Monte-Carlo estimate is

    score_i = 1/(N(N-1)) sum_{n != k} ||x_n - x_k||^alpha - 2/(NM) sum_n sum_m ||x_n - z_m||^alpha,

and the loss is -mean_i score_i (the official code averages over positions; the paper sums).
The first term rewards diversity, the second fidelity. Higher scores are better.

Implementation notes (why, not what):
- Everything runs in fp32 (fp64 stays fp64) with autocast off: inputs arrive in bf16 under mixed
  precision, and the score is a small difference of large sums.
- The diagonal n == k is never formed: only the N(N-1)/2 pairs n < k are, because the gradient of
  a norm at distance 0 is undefined. Where two samples (or a sample and a target) coincide the
  gradient of that term is taken as 0, its subgradient, so gradients stay finite.
- The sample-target term never materialises the (N, M, P, l) difference tensor that the official
  code builds: distances come from ``torch.cdist`` (direct, not the matmul shortcut, so they are
  exact), and a custom backward forms the gradient with two batched matmuls, so extra memory is
  O(N M P). The sample-sample term uses explicit differences, O(N^2 P l), which is small for the
  N = 8 the paper uses and exact even for nearly coincident samples.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

__all__ = ["energy_score", "energy_loss", "energy_terms"]


def energy_score(samples: Tensor, targets: Tensor, alpha: float = 1.0, diversity_weight: float = 1.0) -> Tensor:
    """Monte-Carlo energy score per position (paper Eqs. 9-10); higher is better.

    Args:
        samples: (N, P, l) model samples: N >= 2 per position, P positions, latent dim l.
        targets: (M, P, l) target samples for the same positions, M >= 1.
        alpha: exponent of the distance, in (0, 2]. Strictly proper for alpha < 2; alpha = 2 is
            only proper (the paper's Table 4 shows training then fails). Default 1.
        diversity_weight: λ multiplying the diversity term (ours): 1 is the energy score; λ < 1
            rewards sharper distributions than the target's and is no longer proper.

    Returns:
        (P,) fp32 tensor (fp64 if an input is fp64): score_i of the module docstring.
    """
    diversity, fidelity = energy_terms(samples, targets, alpha)
    return diversity_weight * diversity - 2.0 * fidelity


def energy_terms(samples: Tensor, targets: Tensor, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """The energy score's two terms per position: (diversity, fidelity), each (P,).

    diversity = 1/(N(N-1)) Σ_{n≠k} ‖x_n − x_k‖^α and fidelity = 1/(NM) Σ_n Σ_m ‖x_n − z_m‖^α; the
    score is diversity − 2·fidelity. Shapes, dtypes and errors as :func:`energy_score`.
    """
    _check_energy_inputs(samples, targets, alpha)
    num_samples = samples.shape[0]
    dtype = torch.promote_types(torch.promote_types(samples.dtype, targets.dtype), torch.float32)
    with torch.autocast(device_type=samples.device.type, enabled=False):
        x = samples.to(dtype)  # (N, P, l)
        z = targets.to(dtype)  # (M, P, l)
        # Distances are translation invariant; centring each position on its targets keeps the
        # matmul form of the backward pass below well conditioned when latents sit far from 0.
        center = z.detach().mean(dim=0, keepdim=True)  # (1, P, l)
        x = x - center
        z = z - center

        first, second = torch.triu_indices(num_samples, num_samples, offset=1, device=x.device)
        pair_dist = torch.linalg.vector_norm(x[first] - x[second], dim=-1)  # (N(N-1)/2, P)
        # mean over unordered pairs == 1/(N(N-1)) sum over ordered pairs n != k
        diversity = _safe_pow(pair_dist, alpha).mean(dim=0)  # (P,)

        cross_dist = _CrossDistance.apply(x.transpose(0, 1), z.transpose(0, 1))  # (P, N, M)
        fidelity = _safe_pow(cross_dist, alpha).mean(dim=(1, 2))  # (P,)
    return diversity, fidelity


def energy_loss(samples: Tensor, targets: Tensor, alpha: float = 1.0, diversity_weight: float = 1.0) -> Tensor:
    """Energy loss: minus the mean over positions of :func:`energy_score` (a scalar)."""
    return -energy_score(samples, targets, alpha, diversity_weight).mean()


def _check_energy_inputs(samples: Tensor, targets: Tensor, alpha: float) -> None:
    for name, tensor in (("samples", samples), ("targets", targets)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
        if tensor.dim() != 3:
            letter = "N" if name == "samples" else "M"
            raise ValueError(
                f"{name} must have shape ({letter}, num_positions, latent_dim); got shape "
                f"{tuple(tensor.shape)}. Flatten batch and sequence dims into num_positions first"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; got dtype {tensor.dtype}")
    if samples.shape[1:] != targets.shape[1:]:
        raise ValueError(
            f"samples and targets disagree on (num_positions, latent_dim): {tuple(samples.shape[1:])} "
            f"vs {tuple(targets.shape[1:])}; pass targets for the same positions and latent space"
        )
    if samples.shape[0] < 2:
        raise ValueError(
            f"the energy score needs at least 2 model samples per position to estimate "
            f"E||x' - x''||; got N={samples.shape[0]}. Draw num_samples >= 2 from the head"
        )
    if targets.shape[0] < 1:
        raise ValueError("targets has M=0 samples per position; draw at least one target sample")
    if not 0.0 < alpha <= 2.0:
        raise ValueError(
            f"alpha must be in (0, 2] (the energy score is strictly proper for 0 < alpha < 2); got {alpha}"
        )


def _safe_pow(distance: Tensor, alpha: float) -> Tensor:
    """distance ** alpha with gradient 0 (not nan) where distance == 0, for any alpha > 0."""
    if alpha == 1.0:
        return distance
    positive = distance > 0
    safe = torch.where(positive, distance, torch.ones_like(distance))
    return torch.where(positive, safe.pow(alpha), torch.zeros_like(distance))


class _CrossDistance(torch.autograd.Function):
    """Batched Euclidean distances (P, N, l) x (P, M, l) -> (P, N, M) with an O(P N M) backward.

    ``torch.cdist``'s own CUDA backward allocates a (P, M, N, l) buffer, the very tensor we avoid.
    Here d(x_n, z_m)/dx_n = (x_n - z_m) / d_nm, so with w = grad / d (0 where d == 0)
        grad_x_n = x_n sum_m w_nm - sum_m w_nm z_m,   grad_z_m = z_m sum_n w_nm - sum_n w_nm x_n.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, z: Tensor) -> Tensor:
        distance = torch.cdist(x, z, compute_mode="donot_use_mm_for_euclid_dist")
        ctx.save_for_backward(x, z, distance)
        return distance

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, z, distance = ctx.saved_tensors
        positive = distance > 0
        weight = torch.where(positive, grad / torch.where(positive, distance, 1.0), 0.0)  # (P, N, M)
        grad_x = grad_z = None
        if ctx.needs_input_grad[0]:
            grad_x = x * weight.sum(dim=2, keepdim=True) - torch.bmm(weight, z)
        if ctx.needs_input_grad[1]:
            grad_z = z * weight.sum(dim=1).unsqueeze(-1) - torch.bmm(weight.transpose(1, 2), x)
        return grad_x, grad_z
