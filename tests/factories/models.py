"""Tiny models and their configs: the sizes every test builds from, in one place.

Two kinds of config are built here:

- *run configs* (``autoencoder_config``, ``calm_config``, ``gpt_config``): what the tests hand to a
  training stage or a preset; the stage fills in the vocabulary (from the data's tokenizer) and, for
  CALM, the chunk size K and latent size (from the autoencoder);
- *model instances* (``tiny_autoencoder``, ``tiny_calm``, ``tiny_gpt``): built directly, with a
  vocabulary of 50 unless told, seeded with ``torch.manual_seed(seed)`` first (``seed=None`` leaves the
  global generator as it is, for a test that seeds it itself or never did).

Every keyword a test passes overrides one config field, so a test states only what differs from the
tiny defaults; the defaults never change, because tests assert seeded numbers and trained thresholds.
"""

from __future__ import annotations

from typing import Any

import torch

from calm.config import AutoencoderConfig, CALMConfig, GPTConfig
from calm.extensions import build_calm
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM
from calm.models.gpt import GPT

TINY_AE: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "latent_size": 8}
"""Autoencoder sizes of the tiny runs (K = 4, the config's default)."""

TINY_LM: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4}
"""Transformer sizes shared by the tiny CALM and the tiny GPT."""

TINY_CALM: dict[str, Any] = {**TINY_LM, "max_seq_len": 16, "num_samples": 4, "num_target_samples": 8}
"""CALM settings of the tiny runs: 16 steps of K = 4 tokens, N = 4 head samples, M = 8 target samples."""

TINY_GPT: dict[str, Any] = {**TINY_LM, "max_seq_len": 32}
"""GPT settings of the tiny runs: a 32-token context."""


# ----------------------------------------------------------------------------------------------
# run configs: the stage fills in the vocabulary (and CALM's K and latent size)


def autoencoder_config(**overrides: Any) -> AutoencoderConfig:
    """``TINY_AE`` plus ``overrides`` (any AutoencoderConfig field, ``vocab_size`` included)."""
    return AutoencoderConfig(**{**TINY_AE, **overrides})


def calm_config(**overrides: Any) -> CALMConfig:
    """``TINY_CALM`` plus ``overrides``: the CALM a training stage builds over a tiny autoencoder."""
    return CALMConfig(**{**TINY_CALM, **overrides})


def gpt_config(**overrides: Any) -> GPTConfig:
    """``TINY_GPT`` plus ``overrides``: the GPT baseline of the tiny runs."""
    return GPTConfig(**{**TINY_GPT, **overrides})


# ----------------------------------------------------------------------------------------------
# model instances


def tiny_autoencoder(*, vocab: int = 50, seed: int | None = 0, **overrides: Any) -> Autoencoder:
    """A width-32 autoencoder (latent 8, K = 4) over ``vocab`` ids; ``overrides`` go to AutoencoderConfig."""
    if seed is not None:
        torch.manual_seed(seed)
    return Autoencoder(autoencoder_config(vocab_size=vocab, **overrides))


def tiny_calm_config(*, vocab: int = 50, K: int = 4, latent: int = 8, **overrides: Any) -> CALMConfig:
    """The config of ``tiny_calm``: 2 layers of width 32, a 32-step context, N = 4, M = 16, plus ``overrides``."""
    settings = dict(vocab_size=vocab, **TINY_LM, max_seq_len=32, chunk_size=K, latent_size=latent)
    return CALMConfig(**{**settings, "num_samples": 4, "num_target_samples": 16, **overrides})


def tiny_calm(
    *,
    vocab: int = 50,
    K: int = 4,
    latent: int = 8,
    seed: int | None = 0,
    autoencoder: Autoencoder | dict[str, Any] | None = None,
    head_std: float | None = None,
    head_seed: int | None = None,
    **overrides: Any,
) -> CALM:
    """A 2-layer, width-32 CALM over a fresh width-32 autoencoder; ``overrides`` go to ``tiny_calm_config``.

    In order: ``torch.manual_seed(seed)`` (unless None), the autoencoder (``autoencoder`` may be one to
    use as it is, e.g. a trained one, or a dict of AutoencoderConfig overrides), the CALM through
    ``calm.extensions.build_calm`` (so a config with one of our options gets the extended model), and,
    with ``head_std``, the head's zero-initialised output layer redrawn from N(0, head_std²), so that
    samples depend on the hidden state: from the global generator, or from a generator of its own
    seeded ``head_seed`` (which leaves the global one as it was).
    """
    if seed is not None:
        torch.manual_seed(seed)
    if not isinstance(autoencoder, Autoencoder):
        autoencoder = tiny_autoencoder(vocab=vocab, seed=None, latent_size=latent, chunk_size=K, **(autoencoder or {}))
    model = build_calm(tiny_calm_config(vocab=vocab, K=K, latent=latent, **overrides), autoencoder)
    if head_std is not None:
        generator = None if head_seed is None else torch.Generator().manual_seed(head_seed)
        torch.nn.init.normal_(model.head.final_out.weight, std=head_std, generator=generator)
    return model


def tiny_gpt(*, vocab: int = 50, seed: int | None = 0, **overrides: Any) -> GPT:
    """The tiny GPT baseline (``gpt_config``) over ``vocab`` ids; ``overrides`` go to GPTConfig."""
    if seed is not None:
        torch.manual_seed(seed)
    return GPT(gpt_config(vocab_size=vocab, **overrides))
