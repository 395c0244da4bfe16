"""CALM: next-vector prediction with a generative head over a frozen chunk autoencoder.

Paper §4. One backbone step per chunk of K tokens:

- **Input compression** (§4): the previous chunk's K tokens are embedded with the backbone's own
  embedding, concatenated (K·d) and squeezed by Linear(K·d→2d) → SiLU → Linear(2d→d) → LayerNorm.
  ``config.input`` (Table 5) also offers ``continuous``: the previous chunk's latent through
  a Linear(l→d), and ``both``: the sum of the two. The latent is the frozen encoder's posterior
  mean μ of that chunk's tokens (our choice: the paper says only z_{i−1}; μ is deterministic, so the
  KV-cached and full forwards agree, and in generation the decoded chunk is re-encoded, so the
  model sees at inference exactly the kind of input it was trained on).
- **Backbone** (§4, sizes in §7.1): the Llama-style Transformer of ``layers.py``, final RMSNorm, no LM head.
- **Generative head** (``heads.py``; §4.2, and the head ablation of Figs. 8-9): energy (default; one
  pass per sample), flow matching or diffusion, chosen by ``config.head``.
- **Loss** (Eqs. 9-10; the step layout of the authors' code): for a block of L chunks, chunks 0..L−2
  are inputs and chunks 1..L−1 are targets, given as the frozen autoencoder's posterior (clean
  encoder, eval mode, no grad); the head's own objective (energy score with N = 8 samples against
  M = 100 targets by default).

The frozen autoencoder is a submodule, so its weights travel inside the CALM checkpoint, but it is
never trained: its parameters have ``requires_grad=False`` and ``train()`` keeps it in eval mode.

This is the paper's model only. The options of ours beyond the paper (``calm.extensions``) build on
it by subclassing; ``calm.extensions.build_calm`` picks the class a config needs, and this class
refuses a config that turns one of them on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from calm.config import CALMConfig, ConfigError, extensions_in_use
from calm.models import rng
from calm.models.autoencoder import Autoencoder
from calm.models.heads import build_head
from calm.models.layers import Backbone, KVCache, init_weights

__all__ = ["CALM", "ChunkDraws"]


@dataclass(frozen=True)
class ChunkDraws:
    """Draws of the next chunk from a CALM: what generation, both temperature samplers and BrierLM consume.

    ``latents`` (N, ..., l) are head samples, decoded by the frozen autoencoder into K tokens each.
    ``prefix`` (N, ..., p) holds the chunk's first p tokens where the model drew them itself rather than
    through the latent (an extension may: ``calm.extensions.anchor``); None in the paper's CALM. The
    decoded chunk then starts with the prefix, whatever the latent's first positions decode to.
    """

    latents: torch.Tensor
    prefix: torch.Tensor | None = None

    def tokens(self, decode_ids: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The chunks (N, ..., K): ``decode_ids`` (latents (..., l) -> ids (..., K)) with the prefix laid over."""
        ids = decode_ids(self.latents)
        if self.prefix is None:
            return ids
        ids = ids.clone()
        ids[..., : self.prefix.shape[-1]] = self.prefix
        return ids

    def __getitem__(self, index: int | slice | tuple) -> ChunkDraws:
        """The same draws indexed over their leading dimensions, e.g. ``draws[:, 0]``."""
        return ChunkDraws(self.latents[index], None if self.prefix is None else self.prefix[index])


class CALM(nn.Module):
    """The paper's CALM over a frozen ``autoencoder`` (module docstring).

    A subclass (``calm.extensions``) changes it through :meth:`make_head`, :meth:`add_parts`, :meth:`loss`
    and :meth:`sample_next`; the paper's model is what this class does with none of them overridden.
    """

    def __init__(self, config: CALMConfig, autoencoder: Autoencoder) -> None:
        super().__init__()
        config.validate()
        if type(self) is CALM and extensions_in_use(config):
            raise ConfigError(
                f"the config turns on options beyond the paper ({', '.join(extensions_in_use(config))}), which "
                "calm.models.calm.CALM does not implement; build the model with calm.extensions.build_calm"
            )
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
        if self.uses_tokens:
            self.embed_tokens = nn.Embedding(config.vocab_size, d)
            self.embed_proj = nn.Sequential(
                nn.Linear(K * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d, eps=config.rms_norm_eps)
            )
        self.backbone = Backbone(config)
        self.head = self.make_head()
        if self.uses_latents:
            self.latent_proj = nn.Linear(config.latent_size, d)  # after the rest: keeps their initial draws
        self.add_parts()
        for part in self.children():  # initial weights drawn in registration order
            init_weights(part, config.init_std)
        self.head.zero_init_output()
        self.autoencoder = autoencoder
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()

    def make_head(self) -> nn.Module:
        """The generative head: the paper's head named by ``config.head`` (energy, flow or diffusion)."""
        return build_head(self.config)

    def add_parts(self) -> None:
        """Register further submodules before the initial weights are drawn: none in the paper's model (a
        subclass's parts then draw their weights in the same sequence as the paper's parts)."""

    def train(self, mode: bool = True) -> CALM:
        super().train(mode)
        self.autoencoder.eval()  # frozen: never apply its training-time dropouts
        return self

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def uses_tokens(self) -> bool:
        """The backbone input includes the discrete chunk compression (input discrete or both)."""
        return self.config.input in ("discrete", "both")

    @property
    def uses_latents(self) -> bool:
        """The backbone input includes the previous chunk's latent (input continuous or both)."""
        return self.config.input in ("continuous", "both")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("autoencoder.")]

    def num_parameters(self) -> int:
        """Parameters used to generate, as the paper counts them: without the frozen autoencoder (and without
        any training-only part a subclass adds: :meth:`training_only_parameters`)."""
        return sum(p.numel() for p in self.trainable_parameters()) - self.training_only_parameters()

    def training_only_parameters(self) -> int:
        """Parameters that training uses and generation does not: none in the paper's model."""
        return 0

    def compress(self, chunks: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """chunks (B, L, K) token ids -> backbone inputs (B, L, d), as ``config.input`` says (§4, Table 5).

        ``latents`` (B, L, l): the chunks' posterior means when the caller has them already;
        otherwise the frozen encoder computes them (only for input continuous or both).
        """
        B, L, K = chunks.shape
        x = None
        if self.uses_tokens:
            e = self.embed_tokens(chunks).reshape(B, L, K * self.config.hidden_size)
            x = self.embed_proj(e)
        if self.uses_latents:
            mu = self.target_posterior(chunks)[0] if latents is None else latents
            z = self.latent_proj(mu.to(self.latent_proj.weight.dtype))
            x = z if x is None else x + z
        return x

    def hidden_states(
        self, chunks: torch.Tensor, cache: KVCache | None = None, latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """chunks (B, L, K) -> h (B, L, d); h[:, i] conditions the prediction of chunk i + 1."""
        return self.backbone(self.compress(chunks, latents), cache)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        return self.backbone.new_cache(batch_size, max_len, dtype)

    def sample_next(self, h: torch.Tensor, num_samples: int, generator: rng.Generators = None) -> ChunkDraws:
        """Draws of the next chunk: h (..., d) -> :class:`ChunkDraws` of ``num_samples`` head samples per row,
        latents (num_samples, ..., l) (paper §4.2; the temperature samplers of §6 consume these)."""
        return ChunkDraws(self.head.sample(h, num_samples, generator))

    def draw_chunks(self, h: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """h (..., d) -> sampled next chunks (num_samples, ..., K) token ids (T = 1; paper §4.2)."""
        return self.sample_next(h, num_samples, generator).tokens(self.autoencoder.decode_ids)

    @torch.no_grad()
    def target_posterior(self, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ, log σ of the frozen (clean, eval-mode) encoder for chunks (..., K)."""
        mu, log_std = self.autoencoder.encode(chunks)
        return mu.float(), log_std.float()

    def forward(
        self, tokens: torch.Tensor, target_chunks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens (B, T) with T a multiple of K -> (the training loss, metrics) (paper §4.2, Eqs. 9-10).

        ``target_chunks`` (B, T/K) bool, when given, keeps only the predictions of the chunks marked True
        (the loss is their mean): fine-tuning scores the answer's chunks alone (``calm.data.instruct``).
        """
        c = self.config
        B, T = tokens.shape
        if T % c.chunk_size != 0 or T // c.chunk_size < 2:
            raise ValueError(f"a CALM block needs a multiple of K={c.chunk_size} tokens and >= 2 chunks, got {T}")
        chunks = tokens.view(B, T // c.chunk_size, c.chunk_size)
        if self.uses_latents:  # one encoder pass gives both the input latents and the targets
            mu_all, log_std_all = self.target_posterior(chunks)
            h = self.hidden_states(chunks[:, :-1], latents=mu_all[:, :-1])
            mu, log_std = mu_all[:, 1:], log_std_all[:, 1:]
        else:
            h = self.hidden_states(chunks[:, :-1])  # (B, L-1, d)
            mu, log_std = self.target_posterior(chunks[:, 1:])  # (B, L-1, l)
        targets = chunks[:, 1:]
        if target_chunks is not None:  # (B, L-1) positions whose next chunk is a target
            keep = target_chunks[:, 1:].to(torch.bool)
            return self.loss(h[keep], mu[keep], log_std[keep], targets[keep])
        P = mu.shape[0] * mu.shape[1]
        h, mu, log_std = h.reshape(P, -1), mu.reshape(P, -1), log_std.reshape(P, -1)
        return self.loss(h, mu, log_std, targets.reshape(P, c.chunk_size))

    def loss(
        self, h: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss at P positions: the head's own objective (the energy loss by default) for h (P, d)
        against the frozen posterior μ, log σ (P, l) of the target chunks, whose tokens are ``targets`` (P, K)
        (unused here; objectives of ours read them)."""
        return self.head.loss(h, mu, log_std.exp())
