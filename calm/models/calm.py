"""CALM: next-vector prediction with an energy-score head over a frozen chunk autoencoder.

CALM-SPEC §3 (paper §4). One backbone step per chunk of K tokens:

- **Input compression** (§3.2): the previous chunk's K tokens are embedded with the backbone's own
  embedding, concatenated (K·d) and squeezed by Linear(K·d→2d) → SiLU → Linear(2d→d) → LayerNorm.
- **Backbone** (§3.1): the Llama-style Transformer of ``layers.py``, final RMSNorm, no LM head.
- **Energy head** (§3.3): uniform noise ε ∈ [−0.5, 0.5]^64 and the hidden state h go through
  ``num_head_blocks`` residual MLP blocks; the last Linear is zero-initialised. One forward pass
  per sample.
- **Loss** (§3.4–3.5): for a block of L chunks, chunks 0..L−2 are inputs and chunks 1..L−1 are
  targets. Targets are M = 100 samples from the frozen autoencoder's posterior (clean encoder,
  eval mode, no grad); the head draws N = 8 samples per position; loss = −energy score.

The frozen autoencoder is a submodule, so its weights travel inside the CALM checkpoint, but it is
never trained: its parameters have ``requires_grad=False`` and ``train()`` keeps it in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import CALMConfig
from calm.losses import energy_loss
from calm.models.autoencoder import Autoencoder
from calm.models.layers import Backbone, KVCache, init_weights


class MLPBlock(nn.Module):
    """x + down(silu(gate) ⊙ up), with (gate, up) from an MLP over [LN(x); c]; about 6d² params."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(2 * d, d)
        self.fc2 = nn.Linear(d, d)
        self.fc3 = nn.Linear(d, 2 * d)
        self.down = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        u = torch.cat([self.norm(x), c], dim=-1)
        gate, up = self.fc3(F.silu(self.fc2(F.silu(self.fc1(u))))).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class EnergyHead(nn.Module):
    """One-step stochastic generator: (h, uniform noise) -> a latent vector (paper §4.2.1)."""

    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.noise_size = config.noise_size
        self.noise_embd = nn.Linear(config.noise_size, d)
        self.noise_norm = nn.LayerNorm(d, eps=eps)
        self.hidden_embd = nn.Linear(d, d)
        self.hidden_norm = nn.LayerNorm(d, eps=eps)
        self.blocks = nn.ModuleList(MLPBlock(d, eps) for _ in range(config.head_blocks))
        self.final_norm = nn.LayerNorm(d, eps=eps)
        self.final_fc = nn.Linear(d, d)
        self.final_out = nn.Linear(d, config.latent_size)

    def zero_init_output(self) -> None:
        nn.init.zeros_(self.final_out.weight)
        nn.init.zeros_(self.final_out.bias)

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """h (..., d), noise (..., noise_size) -> latent (..., l)."""
        x = self.noise_norm(self.noise_embd(noise))
        c = self.hidden_norm(self.hidden_embd(h))
        for block in self.blocks:
            x = block(x, c)
        return self.final_out(F.silu(self.final_fc(self.final_norm(x))))

    def sample(self, h: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``num_samples`` latents per row of h: (..., d) -> (num_samples, ..., l)."""
        hs = h.unsqueeze(0).expand(num_samples, *h.shape)
        noise = torch.rand((num_samples, *h.shape[:-1], self.noise_size), device=h.device, generator=generator).sub_(
            0.5
        )
        return self(hs, noise.to(h.dtype))


class CALM(nn.Module):
    def __init__(self, config: CALMConfig, autoencoder: Autoencoder) -> None:
        super().__init__()
        config.validate()
        ae = autoencoder.config
        if ae.chunk_size != config.chunk_size:
            raise ValueError(
                f"autoencoder chunk_size={ae.chunk_size} but the language model expects {config.chunk_size}; "
                f"train or pick an autoencoder with chunk_size={config.chunk_size}"
            )
        if ae.latent_size != config.latent_size:
            raise ValueError(
                f"autoencoder latent_size={ae.latent_size} but the language model expects {config.latent_size}; "
                "set the CALM latent_size to the autoencoder's"
            )
        if ae.vocab_size != config.vocab_size:
            raise ValueError(
                f"autoencoder vocab_size={ae.vocab_size} but the language model has {config.vocab_size}; "
                "both must use the same tokenizer"
            )
        self.config = config
        d, K = config.hidden_size, config.chunk_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_proj = nn.Sequential(
            nn.Linear(K * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d, eps=config.rms_norm_eps)
        )
        self.backbone = Backbone(config)
        self.head = EnergyHead(config)
        init_weights(self.embed_tokens, config.init_std)
        init_weights(self.embed_proj, config.init_std)
        init_weights(self.backbone, config.init_std)
        init_weights(self.head, config.init_std)
        self.head.zero_init_output()
        self.autoencoder = autoencoder
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()

    def train(self, mode: bool = True) -> CALM:
        super().train(mode)
        self.autoencoder.eval()  # frozen: never apply its training-time dropouts
        return self

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("autoencoder.")]

    def num_parameters(self) -> int:
        """Parameters of the language model, without the frozen autoencoder (as the paper counts)."""
        return sum(p.numel() for p in self.trainable_parameters())

    def compress(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks (B, L, K) token ids -> backbone inputs (B, L, d)."""
        B, L, K = chunks.shape
        e = self.embed_tokens(chunks).reshape(B, L, K * self.config.hidden_size)
        return self.embed_proj(e)

    def hidden_states(self, chunks: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """chunks (B, L, K) -> h (B, L, d); h[:, i] conditions the prediction of chunk i + 1."""
        return self.backbone(self.compress(chunks), cache)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        return self.backbone.new_cache(batch_size, max_len, dtype)

    @torch.no_grad()
    def target_posterior(self, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ, log σ of the frozen (clean, eval-mode) encoder for chunks (..., K)."""
        mu, log_std = self.autoencoder.encode(chunks)
        return mu.float(), log_std.float()

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens (B, T) with T a multiple of K -> (energy loss, metrics)."""
        c = self.config
        B, T = tokens.shape
        if T % c.chunk_size != 0 or T // c.chunk_size < 2:
            raise ValueError(f"a CALM block needs a multiple of K={c.chunk_size} tokens and >= 2 chunks, got {T}")
        chunks = tokens.view(B, T // c.chunk_size, c.chunk_size)
        h = self.hidden_states(chunks[:, :-1])  # (B, L-1, d)
        mu, log_std = self.target_posterior(chunks[:, 1:])  # (B, L-1, l)
        P = mu.shape[0] * mu.shape[1]
        mu, std = mu.reshape(P, -1), log_std.exp().reshape(P, -1)
        targets = mu + std * torch.randn((c.num_target_samples, *mu.shape), device=mu.device)  # (M, P, l)
        samples = self.head.sample(h.reshape(P, -1), c.num_samples).float()  # (N, P, l)
        loss = energy_loss(samples, targets, c.energy_alpha)
        with torch.no_grad():
            # mean distance of a head sample to the posterior mean: a readable progress signal
            dist = (samples - mu).norm(dim=-1).mean()
        return loss, {"energy_loss": loss.detach(), "sample_dist": dist}
