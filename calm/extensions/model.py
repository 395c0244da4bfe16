"""Ours, beyond the paper: the CALM that carries our options (:class:`ExtendedCALM`).

The paper's model is :class:`calm.models.calm.CALM`; this subclass adds, each when its config field
turns it on (all off by default):

- ``token_aux_weight`` / ``token_aux_tokens``: a training-only linear readout (d → vocab per token) of
  the backbone state h, trained with cross-entropy on the next chunk's first ``token_aux_tokens``
  tokens. It gives the backbone the direct next-token signal a token model gets
  (docs/guides/extensions.md#next-token-auxiliary-term).
- ``token_anchor``: that readout becomes part of the model and draws each chunk's first token
  (:mod:`calm.extensions.anchor`); the chunk starts with it (:attr:`ChunkDraws.prefix`).
- ``energy_diversity_weight`` / ``energy_mean_weight``: the shaped energy loss
  (:mod:`calm.extensions.energy`).
- ``token_score_weight`` / ``token_score_samples``: a log score of the next chunk's first token under
  the mixture of the head's samples, read by a linear latent → vocab probe trained alongside on
  posterior samples; training only. It did not help (docs/research/small-calm.md;
  docs/guides/extensions.md#token-score).

Every extra part's FLOPs and parameters are counted (``calm.models.flops``); the training-only parts
are left out of :meth:`num_parameters`, as the paper counts parameters used to generate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calm.extensions.anchor import AnchoredEnergyHead
from calm.extensions.energy import ShapedEnergyHead
from calm.models import rng
from calm.models.calm import CALM, ChunkDraws

TRAINING_ONLY = ("token_aux_head", "latent_probe")
"""Submodules that only training uses: left out of :meth:`ExtendedCALM.num_parameters`."""


class ExtendedCALM(CALM):
    """The paper's CALM with the options of ours that its config turns on (module docstring)."""

    def make_head(self) -> nn.Module:
        c = self.config
        if c.token_anchor:
            return AnchoredEnergyHead(c)
        if c.head == "energy" and (c.energy_diversity_weight != 1.0 or c.energy_mean_weight > 0):
            return ShapedEnergyHead(c)
        return super().make_head()

    def add_parts(self) -> None:
        c, d = self.config, self.config.hidden_size
        if c.token_aux_weight > 0 and not c.token_anchor:  # the anchored head holds its own readout
            self.token_aux_head = nn.Linear(d, c.token_aux_tokens * c.vocab_size, bias=False)
        if c.token_score_weight > 0:
            self.latent_probe = nn.Linear(c.latent_size, c.vocab_size)

    def training_only_parameters(self) -> int:
        return sum(p.numel() for part in TRAINING_ONLY if hasattr(self, part) for p in getattr(self, part).parameters())

    def sample_next(self, h: torch.Tensor, num_samples: int, generator: rng.Generators = None) -> ChunkDraws:
        """As :meth:`CALM.sample_next`; an anchored head's draws carry their first tokens (num_samples, ..., 1)."""
        if not self.config.token_anchor:
            return super().sample_next(h, num_samples, generator)
        z, tokens = self.head.sample_with_tokens(h, num_samples, generator)
        return ChunkDraws(z, tokens.unsqueeze(-1))

    def loss(
        self, h: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The head's loss (conditioned on the true first tokens for an anchored head), plus the auxiliary
        cross-entropy and the token score where they are on. Shapes as :meth:`CALM.loss`."""
        c = self.config
        P = h.shape[0]
        first = targets[:, 0]
        if c.token_anchor:  # the head conditions on the true first tokens, which its readout learns to draw
            loss, metrics = self.head.loss(h, mu, log_std.exp(), first_tokens=first)
        else:
            loss, metrics = super().loss(h, mu, log_std, targets)
        if c.token_aux_weight > 0:
            n = c.token_aux_tokens  # the next chunk's first n tokens, one readout each
            readout = self.head.token_readout if c.token_anchor else self.token_aux_head
            logits = readout(h).float().view(P * n, c.vocab_size)
            aux = F.cross_entropy(logits, targets[:, :n].reshape(P * n))
            metrics["token_aux_loss"] = aux.detach()
            loss = loss + c.token_aux_weight * aux
        if c.token_score_weight > 0:
            score, probe_loss = self.token_score(h, mu, log_std, first)
            metrics.update(token_score=score.detach(), probe_loss=probe_loss.detach())
            loss = loss + c.token_score_weight * score + probe_loss  # the probe's loss reaches only the probe
        return loss, metrics

    def token_score(
        self, h: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor, first: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(−log mixture probability of the true first token under the head's samples, the probe's own loss).

        h (P, d), μ and log σ (P, l) of the true next chunks, first (P,) their first tokens. The probe learns
        on one posterior sample per position (detached); the head's n samples go through the probe's
        detached weights, so the score trains the head and backbone, and the probe stays a decoder proxy.
        """
        n = self.config.token_score_samples
        target = self.autoencoder.sample_posterior(mu, log_std).detach()
        probe_loss = F.cross_entropy(self.latent_probe(target).float(), first)
        samples = self.head.sample(h, n).float()  # (n, P, l)
        weight, bias = self.latent_probe.weight.detach().float(), self.latent_probe.bias.detach().float()
        log_probs = F.linear(samples, weight, bias).log_softmax(-1)  # (n, P, V)
        log_mixture = torch.logsumexp(log_probs, dim=0) - math.log(n)
        return F.nll_loss(log_mixture, first), probe_loss
