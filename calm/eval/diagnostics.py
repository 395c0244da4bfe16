"""Does CALM's energy head use its context? Cheap diagnostics for every evaluation.

The energy loss alone cannot say whether a small CALM has learned a conditional distribution or only
the unconditional distribution of latents: both lower it. These diagnostics, computed on a fixed
subset of validation positions with common random numbers, separate the two. Our addition, not
part of the paper; they use only the paper's pieces: the energy score (Eqs. 9-10) and the frozen
autoencoder's posterior and decoder (§3).

With α the energy-score exponent (1 by default), head samples x, x' ~ P(·|h) and targets y drawn
from the autoencoder posterior of the true next chunk, the loss at one position is

    loss = 2 E||x − y||^α − E||x − x'||^α          (minus the energy score S(P, y)).

If P equals the distribution Q that y follows, its expectation is E||y − y'||^α (y, y' ~ Q), the
minimum over P because the score is strictly proper. Two reference distances bound that minimum:

- **noise floor** ``D_noise = E||z − z'||^α``, z, z' two posterior samples of the *same* chunk: the
  loss of a perfect model of a language whose next chunk the context determines. Any Q is a
  mixture of such posteriors, and a mixture's E||y − y'||^α is at least the mixture of its
  components' (energy distance ≥ 0), so no head gets below D_noise in expectation.
- **marginal** ``D_marg = E||z_i − z_j||^α``, z_i, z_j posterior samples of the chunks at two
  different random positions: the loss of the best head that ignores its context (the marginal
  distribution of latents is the optimum among context-free predictors, and its loss is D_marg).

So progress reads as ``gap_closed = (D_marg − loss) / (D_marg − D_noise)``: 0 for the best
context-free head, 1 at the noise floor. It can be negative (worse than the marginal, e.g. at
initialisation) and on natural text it stays well below 1 (the next chunk is not determined).

The **conditioning gap** is the energy score with each position's own hidden state minus the score
with the hidden states shuffled across positions (a derangement), with the same targets and the
same head noise: ``cond_gap = loss_shuffled − loss``. Positive means the head uses its context. The
common random numbers make it exactly 0 (not 0 ± noise) for a head that ignores h, and cut its
variance elsewhere. ``cond_gap_se`` is the standard error over positions.

The **next-chunk accuracies** are teacher-forced: a point prediction (the mean of S head samples)
and one head sample are decoded by the autoencoder (argmax) and compared with the true next chunk,
first token and whole chunk. A head whose samples are centred on the right chunk but spread too wide
shows a point-prediction accuracy well above the one-sample accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from calm.models.heads import noise_driven_sampler
from calm.models.losses import energy_score

__all__ = ["HeadDiagnostics", "diagnose_head", "head_diagnostics"]


@dataclass
class HeadDiagnostics:
    """The result of :func:`diagnose_head`; distances and losses are in latent units to the power α."""

    cond_gap: float
    """Energy score with own hidden states minus score with shuffled ones (= loss_shuffled − loss)."""
    cond_gap_se: float
    """Standard error of ``cond_gap`` over positions."""
    diag_energy_loss: float
    """Energy loss (−score) with each position's own hidden state, on the diagnostic positions."""
    diag_energy_loss_shuffled: float
    """Energy loss with hidden states shuffled across positions (same targets, same noise)."""
    noise_floor: float
    """D_noise = E||z − z'||^α over two posterior samples of the same chunk."""
    marginal_distance: float
    """D_marg = E||z_i − z_j||^α over posterior samples of the chunks at two different positions."""
    gap_closed: float
    """(D_marg − diag_energy_loss) / (D_marg − D_noise); nan if D_marg == D_noise."""
    first_token_acc_point: float
    """Teacher-forced first-token accuracy of the decoded mean of S head samples."""
    chunk_acc_point: float
    """Teacher-forced whole-chunk accuracy of the decoded mean of S head samples."""
    first_token_acc_sample: float
    """Teacher-forced first-token accuracy of one decoded head sample."""
    chunk_acc_sample: float
    """Teacher-forced whole-chunk accuracy of one decoded head sample."""
    diag_positions: int
    """Number of positions the diagnostics were computed on."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _derangement(n: int, generator: torch.Generator) -> Tensor:
    """A random permutation with no fixed point: each position gets another's index (n >= 2)."""
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)  # a single cycle through a random order
    return perm


def _pow(distance: Tensor, alpha: float) -> Tensor:
    return distance if alpha == 1.0 else distance.pow(alpha)


@torch.no_grad()
def diagnose_head(
    head: Callable[[Tensor, Tensor], Tensor],
    decode_ids: Callable[[Tensor], Tensor],
    hidden: Tensor,
    target_ids: Tensor,
    mu: Tensor,
    log_std: Tensor,
    *,
    noise_size: int,
    alpha: float = 1.0,
    num_samples: int = 8,
    num_target_samples: int = 100,
    num_point_samples: int = 32,
    seed: int = 0,
    group_size: int = 1024,
) -> HeadDiagnostics:
    """Conditioning gap, reference distances and next-chunk accuracies (module docstring).

    Args:
        head: ``head(h (..., d), noise (..., noise_size)) -> latent (..., l)``, one sample per row
            (``EnergyHead.forward``); noise is uniform on [−0.5, 0.5].
        decode_ids: latents (..., l) -> token ids (..., K) (``Autoencoder.decode_ids``).
        hidden: (P, d) hidden state that conditions each position's prediction, P >= 2.
        target_ids: (P, K) the true next chunk of each position.
        mu, log_std: (P, l) the frozen autoencoder's posterior of ``target_ids``.
        noise_size: width of the head's noise input.
        alpha: energy-score exponent in (0, 2].
        num_samples: N head samples per position for the two energy scores (>= 2).
        num_target_samples: M posterior samples per position (>= 2; pairs give the noise floor).
        num_point_samples: S head samples averaged into the point prediction (>= 1).
        seed: every random draw comes from a CPU generator seeded with this, so the result is
            deterministic given the inputs (and does not touch the global RNG).
        group_size: positions processed at once (bounds memory at about M·group_size·l floats).

    Returns:
        :class:`HeadDiagnostics` (floats; accuracies are fractions in [0, 1]).

    Raises:
        ValueError: on shape mismatches, fewer than 2 positions, or too few samples.
    """
    P = hidden.shape[0]
    _check_inputs(hidden, target_ids, mu, log_std, num_samples, num_target_samples, num_point_samples)
    device = hidden.device
    draws = _Draws(torch.Generator().manual_seed(seed), device, hidden.dtype)
    perm = _derangement(P, draws.gen).to(device)
    mu, std = mu.float(), log_std.float().exp()
    per_position: dict[str, list[Tensor]] = {k: [] for k in ("own", "shuffled", "noise", "marginal")}
    hits: dict[str, list[Tensor]] = {k: [] for k in ("first_point", "chunk_point", "first_one", "chunk_one")}
    for start in range(0, P, group_size):
        idx = torch.arange(start, min(P, start + group_size), device=device)
        losses = _group_losses(
            head, hidden, mu, std, idx, perm, draws, noise_size, alpha, num_samples, num_target_samples
        )
        for k, v in losses.items():
            per_position[k].append(v)
        h_own = hidden[idx]
        samples = head(
            h_own.expand(num_point_samples, *h_own.shape), draws.uniform(num_point_samples, len(idx), noise_size)
        )
        for k, v in _chunk_hits(decode_ids, samples, target_ids[idx]).items():
            hits[k].append(v)
    return _summarise(per_position, hits, P)


def _check_inputs(
    hidden: Tensor,
    target_ids: Tensor,
    mu: Tensor,
    log_std: Tensor,
    num_samples: int,
    num_target_samples: int,
    num_point_samples: int,
) -> None:
    P = hidden.shape[0]
    if P < 2:
        raise ValueError(f"the diagnostics need at least 2 positions to shuffle hidden states; got {P}")
    if target_ids.shape[0] != P or mu.shape[0] != P or log_std.shape != mu.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, target_ids {tuple(target_ids.shape)}, mu {tuple(mu.shape)} and "
            f"log_std {tuple(log_std.shape)} must share the number of positions (first dimension)"
        )
    if num_samples < 2 or num_target_samples < 2 or num_point_samples < 1:
        raise ValueError(
            f"need num_samples >= 2, num_target_samples >= 2 and num_point_samples >= 1; got "
            f"{num_samples}, {num_target_samples}, {num_point_samples}"
        )


class _Draws:
    """Every random draw of the diagnostics, from one seeded CPU generator, moved to the inputs' device."""

    def __init__(self, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> None:
        self.gen, self.device, self.dtype = gen, device, dtype

    def uniform(self, *shape: int) -> Tensor:
        """The head's noise: uniform on [−0.5, 0.5], in the hidden states' dtype."""
        return (torch.rand(shape, generator=self.gen) - 0.5).to(device=self.device, dtype=self.dtype)

    def normal(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.gen).to(self.device)


def _group_losses(
    head: Callable[[Tensor, Tensor], Tensor],
    hidden: Tensor,
    mu: Tensor,
    std: Tensor,
    idx: Tensor,
    perm: Tensor,
    draws: _Draws,
    noise_size: int,
    alpha: float,
    num_samples: int,
    num_target_samples: int,
) -> dict[str, Tensor]:
    """Per position of ``idx``: the energy loss with its own and with the deranged hidden state (same
    targets, same head noise), and the two reference distances (noise floor, marginal)."""
    G, latent = len(idx), mu.shape[1]
    half = num_target_samples // 2
    h_own, h_other = hidden[idx], hidden[perm[idx]]
    targets = mu[idx] + std[idx] * draws.normal(num_target_samples, G, latent)  # (M, G, l)
    noise = draws.uniform(num_samples, G, noise_size)
    own = head(h_own.expand(num_samples, *h_own.shape), noise).float()  # (N, G, l)
    shuffled = head(h_other.expand(num_samples, *h_other.shape), noise).float()
    # reference distances from pairs of posterior samples: (z^0, z^1), (z^2, z^3), ... of one chunk,
    # and z^{2k} of this position against a fresh sample of the chunk at the deranged position
    pairs = torch.linalg.vector_norm(targets[0 : 2 * half : 2] - targets[1 : 2 * half : 2], dim=-1)
    others = mu[perm[idx]] + std[perm[idx]] * draws.normal(half, G, latent)
    cross = torch.linalg.vector_norm(targets[0 : 2 * half : 2] - others, dim=-1)
    return {
        "own": -energy_score(own, targets, alpha),
        "shuffled": -energy_score(shuffled, targets, alpha),
        "noise": _pow(pairs, alpha).mean(0),
        "marginal": _pow(cross, alpha).mean(0),
    }


def _chunk_hits(decode_ids: Callable[[Tensor], Tensor], samples: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Teacher-forced hits of the decoded mean of ``samples`` (S, G, l) and of its first sample against the
    true chunks ``y`` (G, K): first token and whole chunk."""
    point, one = decode_ids(samples.float().mean(0).to(samples.dtype)), decode_ids(samples[0])
    return {
        "first_point": point[:, 0] == y[:, 0],
        "chunk_point": (point == y).all(-1),
        "first_one": one[:, 0] == y[:, 0],
        "chunk_one": (one == y).all(-1),
    }


def _summarise(per_position: dict[str, list[Tensor]], hits: dict[str, list[Tensor]], P: int) -> HeadDiagnostics:
    v = {k: torch.cat(t).double() for k, t in per_position.items()}
    acc = {k: float(torch.cat(t).double().mean()) for k, t in hits.items()}
    diff = v["shuffled"] - v["own"]
    loss, d_noise, d_marg = float(v["own"].mean()), float(v["noise"].mean()), float(v["marginal"].mean())
    span = d_marg - d_noise
    return HeadDiagnostics(
        cond_gap=float(diff.mean()),
        cond_gap_se=float(diff.std() / np.sqrt(P)),
        diag_energy_loss=loss,
        diag_energy_loss_shuffled=float(v["shuffled"].mean()),
        noise_floor=d_noise,
        marginal_distance=d_marg,
        gap_closed=(d_marg - loss) / span if span != 0 else float("nan"),
        first_token_acc_point=acc["first_point"],
        chunk_acc_point=acc["chunk_point"],
        first_token_acc_sample=acc["first_one"],
        chunk_acc_sample=acc["chunk_one"],
        diag_positions=P,
    )


def diagnostic_positions(num_blocks: int, steps_per_block: int, max_positions: int) -> np.ndarray:
    """A fixed, evenly spread subset of the ``num_blocks · steps_per_block`` predicted positions."""
    total = num_blocks * steps_per_block
    want = max(2, min(max_positions, total))
    return np.unique(np.linspace(0, total - 1, want).round().astype(np.int64))


@torch.no_grad()
def head_diagnostics(
    model: Any,
    blocks: Tensor | np.ndarray,
    *,
    max_positions: int = 1024,
    num_point_samples: int = 32,
    seed: int = 0,
    batch_blocks: int = 8,
) -> HeadDiagnostics:
    """:func:`diagnose_head` for a CALM model on validation blocks (B, T), T a multiple of K.

    Positions are the predicted chunks 1..L−1 of every block (as in training); a fixed, evenly spread
    subset of at most ``max_positions`` of them is scored. The energy scores use the model's own
    ``num_samples`` (N), ``num_target_samples`` (M) and ``energy_alpha``. The model is put in eval
    mode for the call and restored afterwards.
    """
    blocks = torch.as_tensor(np.asarray(blocks) if isinstance(blocks, np.ndarray) else blocks, dtype=torch.long)
    K = model.chunk_size
    if blocks.dim() != 2 or blocks.shape[1] % K != 0 or blocks.shape[1] // K < 2:
        raise ValueError(f"blocks must be (B, T) with T a multiple of K={K} and >= 2 chunks; got {tuple(blocks.shape)}")
    device = next(model.parameters()).device
    B, L = blocks.shape[0], blocks.shape[1] // K
    chosen = torch.from_numpy(diagnostic_positions(B, L - 1, max_positions))
    hidden, targets = [], []
    was_training = model.training
    model.eval()
    try:
        for first in range(0, B, batch_blocks):
            rows = torch.arange(first, min(B, first + batch_blocks))
            flat = chosen[(chosen >= first * (L - 1)) & (chosen < (rows[-1] + 1) * (L - 1))] - first * (L - 1)
            if len(flat) == 0:
                continue
            chunks = blocks[rows].view(len(rows), L, K).to(device)
            h = model.hidden_states(chunks[:, :-1])  # (b, L-1, d)
            hidden.append(h.reshape(-1, h.shape[-1])[flat.to(device)])
            targets.append(chunks[:, 1:].reshape(-1, K)[flat.to(device)])
        target_ids = torch.cat(targets)
        mu, log_std = model.target_posterior(target_ids)
        c = model.config
        return diagnose_head(
            noise_driven_sampler(model.head),  # any head (Figs. 8-9): flow and diffusion too
            model.autoencoder.decode_ids,
            torch.cat(hidden),
            target_ids,
            mu,
            log_std,
            noise_size=getattr(model.head, "noise_size", c.noise_size),  # the anchored head takes one more
            alpha=c.energy_alpha,
            # the noise floor needs pairs of posterior samples: a model trained with M = 1 (paper
            # Table 3) or N = 1 is diagnosed with 2; the estimates stay unbiased, only noisier
            num_samples=max(c.num_samples, 2),
            num_target_samples=max(c.num_target_samples, 2),
            num_point_samples=num_point_samples,
            seed=seed,
        )
    finally:
        model.train(was_training)
