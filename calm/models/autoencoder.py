"""The context-free chunk autoencoder: K tokens <-> one latent vector (paper §3).

Encoder: embed K tokens -> per-token AELayers -> flatten -> squeeze Linear(K·d -> d) -> AELayers ->
RMSNorm -> Linear(d -> 2l) -> (μ, log σ). Decoder: Linear(l -> d) -> AELayers -> expand
Linear(d -> K·d) -> per-token AELayers -> RMSNorm -> logits against the input embedding (tied).
An AELayer is a pre-norm residual SwiGLU MLP; there is no attention anywhere, so chunks are
independent.

Training (paper Eqs. 1-4): DropToken replaces input ids by ``drop_token_id`` with p = 0.15,
z = μ + σ·ε is sampled, DropLatent applies inverted dropout p = 0.15 to z, and the loss is
``CE·K + β·Σ_j max(λ_KL, KL_j)`` with the KL clipped per dimension at λ_KL = 0.5, summed over the
latent dimensions and averaged over chunks, β = 1e-3. The ablations of the paper's Table 2 and
Figs. 6-7 are config switches: ``kl_mode`` off | plain | clipped, ``kl_weight`` β, ``token_dropout``
/ ``latent_dropout`` 0 to turn DropToken / DropLatent off, and ``latent_size`` (see
``calm.config.latent_ablation_overrides``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import AutoencoderConfig
from calm.models.layers import RMSNorm, SwiGLU, init_weights
from calm.models.vocab_search import ArgmaxScreens, Int8Screen, vocab_argmax


class AELayer(nn.Module):
    """x + SwiGLU(RMSNorm(x))."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def _stack(config: AutoencoderConfig, n: int) -> nn.Sequential:
    return nn.Sequential(*(AELayer(config) for _ in range(n)))


def clipped_kl(mu: torch.Tensor, log_std: torch.Tensor, clamp: float | None) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, 1)) per dimension, clamped below at ``clamp``; summed over the last dim.

    ``clamp=None`` gives the plain KL. Returns a tensor of the leading shape (one value per chunk).
    """
    kl = 0.5 * (mu.pow(2) + torch.exp(2 * log_std) - 1.0 - 2.0 * log_std)
    return (kl if clamp is None else kl.clamp(min=clamp)).sum(-1)


def kl_term(mu: torch.Tensor, log_std: torch.Tensor, config: AutoencoderConfig) -> torch.Tensor:
    """The KL regulariser of ``config.kl_mode`` (paper Table 2), mean over chunks, before β.

    off: 0 (reconstruction only); plain: Σ_j KL_j; clipped: Σ_j max(λ_KL, KL_j).
    """
    if config.kl_mode == "off":
        return mu.new_zeros(())
    return clipped_kl(mu, log_std, config.kl_clamp if config.kl_mode == "clipped" else None).mean()


INT8_SCREEN_MIN_VOCAB = 2**15
"""``Autoencoder.decode_ids`` uses the int8 screen (``calm.models.vocab_search``) from this vocabulary size
on (the paper's 128k); below it the vocabulary product is cheap and runs as before."""


@dataclass
class AutoencoderOutput:
    loss: torch.Tensor
    """The training objective: CE·K + β·KL in training mode, plain mean CE in eval mode."""
    ce: torch.Tensor
    kl: torch.Tensor
    logits: torch.Tensor
    """(..., K, V)"""
    mu: torch.Tensor
    log_std: torch.Tensor


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d, K, latent = config.hidden_size, config.chunk_size, config.latent_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        # encoder
        self.enc_token_layers = _stack(config, config.num_encoder_layers // 2)
        self.squeeze_layer = nn.Linear(K * d, d)
        self.enc_chunk_layers = _stack(config, config.num_encoder_layers // 2)
        self.enc_norm = RMSNorm(d, config.rms_norm_eps)
        self.hidden_to_latent = nn.Linear(d, 2 * latent)
        # decoder
        self.latent_to_hidden = nn.Linear(latent, d)
        self.dec_chunk_layers = _stack(config, config.num_decoder_layers // 2)
        self.expand_layer = nn.Linear(d, K * d)
        self.dec_token_layers = _stack(config, config.num_decoder_layers // 2)
        self.dec_norm = RMSNorm(d, config.rms_norm_eps)
        init_weights(self, config.init_std)
        self._screen: Int8Screen | None = None
        self.argmax_screens: Callable[[torch.device], ArgmaxScreens] | None = None
        """Which exact screens :meth:`vocab_argmax` may use on a device (None: the plain product). The model
        does not probe the hardware: ``calm.checkpoint.load_model`` sets this from ``calm.hardware``."""

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (..., K) -> μ, log σ, each (..., l)."""
        K, d = self.config.chunk_size, self.config.hidden_size
        if ids.shape[-1] != K:
            raise ValueError(f"autoencoder expects chunks of {K} tokens, got a last dimension of {ids.shape[-1]}")
        h = self.enc_token_layers(self.embed_tokens(ids))  # (..., K, d)
        h = self.squeeze_layer(h.reshape(*ids.shape[:-1], K * d))  # (..., d)
        h = self.enc_norm(self.enc_chunk_layers(h))
        mu, log_std = self.hidden_to_latent(h).float().chunk(2, dim=-1)
        return mu, log_std

    def decode_hidden(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., l) -> final hidden states (..., K, d), before the tied vocabulary projection."""
        K, d = self.config.chunk_size, self.config.hidden_size
        h = self.dec_chunk_layers(self.latent_to_hidden(z))
        h = self.expand_layer(h).reshape(*z.shape[:-1], K, d)
        return self.dec_norm(self.dec_token_layers(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., l) -> logits (..., K, V)."""
        return self.decode_hidden(z) @ self.embed_tokens.weight.t()

    @torch.no_grad()
    def decode_ids(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., l) -> argmax token ids (..., K): ``decode(z).argmax(-1)``, computed faster."""
        h = self.decode_hidden(z)
        return self.vocab_argmax(h.reshape(-1, h.shape[-1])).view(h.shape[:-1])

    @torch.no_grad()
    def vocab_argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (M, d) -> (M,) argmax ids of their logits against the tied embedding.

        Exact (the reference matmul's argmax, lowest id on a tie); through the certified int8 screen
        where :meth:`vocab_screen` has one, else through :func:`vocab_argmax`.
        """
        weight = self.embed_tokens.weight
        screens = ArgmaxScreens() if self.argmax_screens is None else self.argmax_screens(weight.device)
        screen = self.vocab_screen(screens.int8)
        if screen is not None:
            return screen.argmax(hidden)
        return vocab_argmax(hidden, weight, bf16_screen=screens.bf16)

    def vocab_screen(self, allowed: bool = True) -> Int8Screen | None:
        """The int8 screen of the embedding table (built once, rebuilt when the table changes), or None.

        None when not ``allowed`` (the device has no int8 matmuls: :attr:`argmax_screens`), when the
        vocabulary is small (under ``INT8_SCREEN_MIN_VOCAB``) or the module is training.
        """
        weight = self.embed_tokens.weight
        if not allowed or self.training or weight.shape[0] < INT8_SCREEN_MIN_VOCAB:
            self._screen = None
            return None
        if self._screen is None or not self._screen.is_current(weight):
            self._screen = Int8Screen(weight.detach())
        return self._screen

    def sample_posterior(
        self, mu: torch.Tensor, log_std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        return mu + torch.exp(log_std) * eps

    def forward(self, ids: torch.Tensor) -> AutoencoderOutput:
        """ids (..., K): clean target chunks. Applies the training regularisers only in train mode."""
        c = self.config
        inputs = ids
        if self.training and c.token_dropout > 0:
            keep = torch.rand(ids.shape, device=ids.device) >= c.token_dropout
            inputs = torch.where(keep, ids, torch.full_like(ids, c.drop_token_id))
        mu, log_std = self.encode(inputs)
        z = self.sample_posterior(mu, log_std)
        if self.training and c.latent_dropout > 0:
            z = F.dropout(z, p=c.latent_dropout, training=True)
        logits = self.decode(z.to(mu.dtype))
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))
        kl = kl_term(mu, log_std, c)
        loss = ce * c.chunk_size + c.kl_weight * kl if self.training else ce
        return AutoencoderOutput(loss=loss, ce=ce, kl=kl, logits=logits, mu=mu, log_std=log_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
