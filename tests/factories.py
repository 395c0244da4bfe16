"""Tiny models shared by the tests: one place for the CALM every sampler/generation test builds."""

from __future__ import annotations

from typing import Any

import torch

from calm.config import AutoencoderConfig, CALMConfig
from calm.extensions import build_calm
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM


def tiny_calm(*, vocab: int = 50, K: int = 4, latent: int = 8, seed: int = 0, **overrides: Any) -> CALM:
    """A 2-layer, width-32 CALM over a fresh width-32 autoencoder, seeded; ``overrides`` go to CALMConfig."""
    torch.manual_seed(seed)
    ae = Autoencoder(
        AutoencoderConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, latent_size=latent, chunk_size=K)
    )
    settings = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        max_seq_len=32,
        chunk_size=K,
        latent_size=latent,
        num_samples=4,
        num_target_samples=16,
    )
    return build_calm(CALMConfig(**{**settings, **overrides}), ae)
