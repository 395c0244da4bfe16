"""Ours, beyond the paper: the energy head anchored on a discrete first token (``model.token_anchor``).

Each CALM step still emits one chunk of K tokens, but its first token is drawn the way a token model
draws one, from a softmax readout of the backbone state h, and the energy head (paper §4.2) draws the
latent given h and that token. The emitted chunk starts with the drawn token
(:attr:`calm.models.calm.ChunkDraws.prefix`), in generation, both temperature samplers (paper §6) and
BrierLM (paper §5). Why: in the latent space of a small autoencoder the energy score hardly pays for
topic or register, and the readout carries them into the samples (docs/research/small-calm.md).

With the anchor, Brier-1 scores the readout, a token-level prediction, not next-vector prediction;
Brier-2..4 score the head as well. Off by default; needs ``token_aux_weight`` > 0 (the readout's
training), ``token_aux_tokens`` 1 and the energy head. Guide: docs/guides/extensions.md#anchored-head.
"""

from __future__ import annotations

import torch
from torch import nn

from calm.config import CALMConfig
from calm.extensions.energy import ShapedEnergyLoss
from calm.models import rng
from calm.models.heads import EnergyHead, posterior_samples


class AnchoredEnergyHead(ShapedEnergyLoss, EnergyHead):
    """The energy head anchored on a discrete first token (``token_anchor``): the chunk's first token is
    drawn from a softmax readout of h, then the latent from the energy head conditioned on h and that token.

    The model factorises p(chunk | h) = p(t₁ | h) · p(z | h, t₁): a linear readout (d → vocab),
    trained by :class:`~calm.extensions.model.ExtendedCALM`'s auxiliary cross-entropy (weight
    ``token_aux_weight``), draws t₁;
    its embedding, LayerNorm'd as the noise is, joins the head's condition, and a learned per-token
    offset is added to the latent (:meth:`latent`). Training conditions on the true t₁ (teacher
    forcing, exact for this factorisation); the energy score is then the conditional one. The readout is
    what carries topic and register into the samples: in the tiny autoencoder's latent space the
    energy score hardly pays for them (docs/research/small-calm.md). One readout per step
    (2·d·vocab FLOPs), not per sample. The noise has one more coordinate than ``noise_size``: its
    uniform picks t₁ by the inverse CDF, so ``forward(h, noise)`` stays a deterministic function
    of its noise, as ``calm.eval.diagnostics`` needs.
    """

    def __init__(self, config: CALMConfig) -> None:
        super().__init__(config)
        d, eps = config.hidden_size, config.rms_norm_eps
        self.noise_size = config.noise_size + 1
        self.token_readout = nn.Linear(d, config.vocab_size, bias=False)
        self.token_embd = nn.Embedding(config.vocab_size, d)
        self.token_norm = nn.LayerNorm(d, eps=eps)
        self.token_latent = nn.Embedding(config.vocab_size, config.latent_size)

    def zero_init_output(self) -> None:
        super().zero_init_output()
        nn.init.zeros_(self.token_latent.weight)

    def first_tokens(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """h (..., d), uniforms u (..., n) in [0, 1) -> first tokens (..., n) ~ softmax(readout(h))."""
        cdf = self.token_readout(h).float().softmax(-1).cumsum(-1)
        # the first index whose cdf exceeds u·total: never a token of probability 0, even for u = 0, a cdf
        # that rounds below 1, or u rounded up to 1 (bf16 noise): u is capped just below 1
        u = (u.float().clamp(max=1.0 - 1e-6) * cdf[..., -1:]).contiguous()
        return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)

    def latent(self, h: torch.Tensor, noise: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """h (..., d), noise (..., noise_size − 1), first tokens (...) -> latent (..., l).

        The trunk's output is added to a learned latent offset per first token (``token_latent``, zero at
        init), which the loss's gradient reaches directly. Measured at the demo's budget: it did not change
        how often a latent decodes to its own first token (16% against 18%), but it raised Brier-2 on
        average over seeds (docs/research/small-calm.md).
        """
        c = self.hidden_norm(self.hidden_embd(h)) + self.token_norm(self.token_embd(tokens)).to(h.dtype)
        return self.trunk(self.noise_norm(self.noise_embd(noise)), c) + self.token_latent(tokens)

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """h (..., d), noise (..., noise_size) uniform in [−½, ½) -> latent (..., l); the last noise
        coordinate draws the first token."""
        tokens = self.first_tokens(h, noise[..., -1:].float() + 0.5)[..., 0]
        return self.latent(h, noise[..., :-1], tokens)

    def sample_with_tokens(
        self, h: torch.Tensor, num_samples: int, generator: rng.Generators = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., d) -> latents (num_samples, ..., l) and their first tokens (num_samples, ...).

        The readout runs once per row of h, not once per sample. The chunk a sample stands for starts
        with its drawn token (``ChunkDraws.prefix``): the latent's own first position is decoded (or, on
        the lazy path, skipped) and then replaced.
        """
        shape = (num_samples, *h.shape[:-1])
        noise = rng.draw(torch.rand, (*shape, self.noise_size), generator, h.device).sub_(0.5)
        tokens = self.first_tokens(h, noise[..., -1].movedim(0, -1) + 0.5).movedim(-1, 0)  # (num_samples, ...)
        z = self.latent(h.unsqueeze(0).expand(*shape, h.shape[-1]), noise[..., :-1].to(h.dtype), tokens)
        return z, tokens

    def sample(self, h: torch.Tensor, num_samples: int, generator: rng.Generators = None) -> torch.Tensor:
        """(..., d) -> (num_samples, ..., l): the latents of :meth:`sample_with_tokens`."""
        return self.sample_with_tokens(h, num_samples, generator)[0]

    def loss(
        self,
        h: torch.Tensor,
        mu: torch.Tensor,
        std: torch.Tensor,
        generator: torch.Generator | None = None,
        first_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Energy score of samples conditioned on the true first tokens (P,). The readout's cross-entropy on
        them is the auxiliary term :class:`~calm.extensions.model.ExtendedCALM` adds (``token_aux_weight``)."""
        if first_tokens is None:
            raise ValueError("the anchored head's loss needs the target chunks' first tokens (first_tokens=)")
        c = self.config
        n = c.num_samples
        targets = posterior_samples(mu, std, c.num_target_samples, generator)  # (M, P, l)
        noise = torch.rand((n, *h.shape[:-1], c.noise_size), device=h.device, generator=generator).sub_(0.5)
        samples = self.latent(h.unsqueeze(0).expand(n, *h.shape), noise.to(h.dtype), first_tokens.expand(n, -1))
        return self.energy_loss(samples.float(), targets, mu)
