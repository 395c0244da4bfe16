"""Ours, beyond the paper: two changes to the energy loss of the energy head (paper Eqs. 9-10).

- ``energy_diversity_weight`` λ (default 1, the paper's score): the head is trained with
  λ·E‖x′ − x″‖^α − 2·E‖x − z‖^α. Below 1 the diversity term is weakened, so the loss is no longer a
  proper scoring rule and its optimum is sharper than the data's distribution, as a temperature
  below 1 would be (for a Gaussian target the optimal spread shrinks by λ/√(2 − λ²)).
- ``energy_mean_weight`` (default 0): adds that weight times the energy loss with α = 2. In
  expectation that score is −2‖E[x] − E[z]‖² + const, an unbiased regression of the head's sample
  mean on the target that leaves the spread alone, so the sum stays strictly proper.

The logged ``energy_loss`` is always the paper's proper score (λ = 1, no mean term), so runs with and
without these options compare on it. Both options are off by default; the demo uses λ = 0.6. Guides:
docs/guides/extensions.md#weakened-diversity-term and docs/guides/extensions.md#mean-term.
"""

from __future__ import annotations

import torch

from calm.models.heads import EnergyHead, sample_distance
from calm.models.losses import energy_loss, energy_terms


class ShapedEnergyLoss:
    """A mixin for an :class:`~calm.models.heads.EnergyHead` (subclass): trains on the shaped score of the
    module docstring and logs the paper's score next to it."""

    config: object

    def energy_loss(
        self, samples: torch.Tensor, targets: torch.Tensor, mu: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Head samples (N, P, l), fp32, posterior samples (M, P, l), means μ (P, l) -> (trained loss, metrics).

        metrics: ``energy_loss`` (the paper's score, for comparison), ``mean_loss`` (the α = 2 term, when
        on), ``sample_dist``.
        """
        c = self.config
        diversity, fidelity = energy_terms(samples, targets, c.energy_alpha)  # (P,) each
        metrics = {"energy_loss": (2.0 * fidelity - diversity).mean().detach()}
        loss = (2.0 * fidelity - c.energy_diversity_weight * diversity).mean()
        if c.energy_mean_weight > 0:
            mean_loss = energy_loss(samples, targets, 2.0)
            metrics["mean_loss"] = mean_loss.detach()
            loss = loss + c.energy_mean_weight * mean_loss
        return loss, {**metrics, "sample_dist": sample_distance(samples, mu)}


class ShapedEnergyHead(ShapedEnergyLoss, EnergyHead):
    """The paper's energy head trained with the shaped energy loss (module docstring)."""
