"""Ours, beyond the paper: an InfoNCE term that shapes the autoencoder's latents by context (``context_weight``).

The paper's autoencoder is context-free (paper §3): each chunk is encoded alone, so two chunks of
one document need not lie closer than two chunks of different documents, and the energy score the
language model is trained with hardly pays for topic or register (docs/research/small-calm.md).
With ``context_weight`` > 0 the autoencoder stage draws half of each batch as usual and pairs it
with the chunks that follow (:func:`neighbour_rows`), and adds ``context_weight`` × an InfoNCE loss
(:func:`context_nce`) pulling each chunk's posterior mean toward its successor's, against the other
successors in the batch. The encoder stays context-free at inference; only its latent geometry
changes. Off by default; the demo uses weight 2. Guide:
docs/guides/extensions.md#context-term-in-the-autoencoder.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def context_nce(mu: torch.Tensor, next_mu: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE of chunks against the chunks that follow them.

    mu, next_mu (B, l): posterior means of B chunks and of their successors. Row i's logits are
    −‖μ_i − μ'_j‖ / τ over the B successors, the right one j = i: a scalar cross-entropy, fp32, whose
    minimum pulls neighbouring chunks together in the Euclidean distance the energy score uses.
    """
    logits = -torch.cdist(mu.float(), next_mu.float()) / tau
    return F.cross_entropy(logits, torch.arange(mu.shape[0], device=mu.device))


def neighbour_rows(indices: np.ndarray, num_items: int) -> np.ndarray:
    """The rows of a batch for the context term: the first ⌊B/2⌋ ``indices`` (sorted), then the chunk after
    each of them (the last chunk stands for its own successor), so rows i and ⌊B/2⌋ + i are neighbours;
    2·⌊B/2⌋ rows (B itself for the usual even batches)."""
    first = np.sort(indices[: max(1, len(indices) // 2)])
    return np.concatenate([first, np.minimum(first + 1, num_items - 1)])


def context_term(mu: torch.Tensor, tau: float) -> torch.Tensor:
    """:func:`context_nce` of a batch built by :func:`neighbour_rows`: its posterior means μ (2·H, l)."""
    half = mu.shape[0] // 2
    return context_nce(mu[:half], mu[half : 2 * half], tau)
