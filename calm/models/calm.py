"""CALM: next-vector prediction with a generative head over a frozen chunk autoencoder.

CALM-SPEC §3 (paper §4). One backbone step per chunk of K tokens:

- **Input compression** (§3.2): the previous chunk's K tokens are embedded with the backbone's own
  embedding, concatenated (K·d) and squeezed by Linear(K·d→2d) → SiLU → Linear(2d→d) → LayerNorm.
  ``config.input`` (§8.5, Table 5) also offers ``continuous``: the previous chunk's latent through
  a Linear(l→d), and ``both``: the sum of the two. The latent is the frozen encoder's posterior
  mean μ of that chunk's tokens (choice: the spec says only z_{i−1}; μ is deterministic, so the
  KV-cached and full forwards agree, and in generation the decoded chunk is re-encoded, so the
  model sees at inference exactly the kind of input it was trained on).
- **Backbone** (§3.1): the Llama-style Transformer of ``layers.py``, final RMSNorm, no LM head.
- **Generative head** (``heads.py``; §3.3, §3.6): energy (default; one pass per sample), flow
  matching or diffusion, chosen by ``config.head``; ours: the energy head anchored on a discrete
  first token (``token_anchor``).
- **Loss** (§3.4–3.5): for a block of L chunks, chunks 0..L−2 are inputs and chunks 1..L−1 are
  targets, given as the frozen autoencoder's posterior (clean encoder, eval mode, no grad); the
  head's own objective (energy score with N = 8 samples against M = 100 targets by default).

The frozen autoencoder is a submodule, so its weights travel inside the CALM checkpoint, but it is
never trained: its parameters have ``requires_grad=False`` and ``train()`` keeps it in eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import CALMConfig
from calm.models.autoencoder import Autoencoder
from calm.models.heads import EnergyHead, MLPBlock, build_head
from calm.models.layers import Backbone, KVCache, init_weights

# the head classes lived here before heads.py; kept importable
__all__ = ["CALM", "EnergyHead", "MLPBlock", "with_first_tokens"]


_TRAINING_ONLY = ("token_aux_head", "latent_probe")
"""Submodules (ours) that only training uses: left out of ``CALM.num_parameters``."""


def with_first_tokens(ids: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
    """Decoded chunks (..., K) with position 0 set to ``first`` (...), the anchored head's drawn tokens
    (``token_anchor``, ours); unchanged when ``first`` is None."""
    if first is None:
        return ids
    ids = ids.clone()
    ids[..., 0] = first
    return ids


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
        if self.uses_tokens:
            self.embed_tokens = nn.Embedding(config.vocab_size, d)
            self.embed_proj = nn.Sequential(
                nn.Linear(K * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d, eps=config.rms_norm_eps)
            )
        self.backbone = Backbone(config)
        self.head = build_head(config)
        if self.uses_latents:
            self.latent_proj = nn.Linear(config.latent_size, d)  # after the rest: keeps their initial draws
        if config.token_aux_weight > 0 and not config.token_anchor:  # ours: training-only readout of h
            self.token_aux_head = nn.Linear(d, config.token_aux_tokens * config.vocab_size, bias=False)
        if config.token_score_weight > 0:  # ours: training-only probe latent -> first token of the chunk
            self.latent_probe = nn.Linear(config.latent_size, config.vocab_size)
        for part in ("embed_tokens", "embed_proj", "backbone", "head", "latent_proj", "token_aux_head", "latent_probe"):
            if hasattr(self, part):
                init_weights(getattr(self, part), config.init_std)
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
        """Parameters used to generate, as the paper counts: without the frozen autoencoder and without
        the training-only ``token_aux_head`` and ``latent_probe`` (ours)."""
        extra = sum(
            p.numel() for part in _TRAINING_ONLY if hasattr(self, part) for p in getattr(self, part).parameters()
        )
        return sum(p.numel() for p in self.trainable_parameters()) - extra

    def compress(self, chunks: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """chunks (B, L, K) token ids -> backbone inputs (B, L, d), as ``config.input`` says (§3.2, §8.5).

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

    def sample_next(
        self, h: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head samples for the next chunk: h (..., d) -> latents (num_samples, ..., l) and, for a head
        anchored on a discrete first token (``token_anchor``, ours), those tokens (num_samples, ...), else None.

        Decode with ``with_first_tokens(autoencoder.decode_ids(z), first)`` (or :meth:`draw_chunks`):
        an anchored chunk starts with its drawn token, whatever the latent's first position decodes to.
        """
        if self.config.token_anchor:
            return self.head.sample_with_tokens(h, num_samples, generator)
        return self.head.sample(h, num_samples, generator), None

    def draw_chunks(self, h: torch.Tensor, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """h (..., d) -> sampled next chunks (num_samples, ..., K) token ids (T = 1; CALM-SPEC §3.3)."""
        z, first = self.sample_next(h, num_samples, generator)
        return with_first_tokens(self.autoencoder.decode_ids(z), first)

    @torch.no_grad()
    def target_posterior(self, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ, log σ of the frozen (clean, eval-mode) encoder for chunks (..., K)."""
        mu, log_std = self.autoencoder.encode(chunks)
        return mu.float(), log_std.float()

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens (B, T) with T a multiple of K -> (the head's loss, metrics)."""
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
        P = mu.shape[0] * mu.shape[1]
        h, mu, log_std = h.reshape(P, -1), mu.reshape(P, -1), log_std.reshape(P, -1)
        if c.token_anchor:  # ours: the head conditions on the true first tokens, which its readout learns to draw
            loss, metrics = self.head.loss(h, mu, log_std.exp(), first_tokens=chunks[:, 1:, 0].reshape(P))
        else:
            loss, metrics = self.head.loss(h, mu, log_std.exp())
        if c.token_aux_weight > 0:
            n = c.token_aux_tokens  # the next chunk's first n tokens, one readout each
            readout = self.head.token_readout if c.token_anchor else self.token_aux_head
            logits = readout(h).float().view(P * n, c.vocab_size)
            aux = F.cross_entropy(logits, chunks[:, 1:, :n].reshape(P * n))
            metrics["token_aux_loss"] = aux.detach()
            loss = loss + c.token_aux_weight * aux
        if c.token_score_weight > 0:
            score, probe_loss = self._token_score(h, mu, log_std, chunks[:, 1:, 0].reshape(P))
            metrics.update(token_score=score.detach(), probe_loss=probe_loss.detach())
            loss = loss + c.token_score_weight * score + probe_loss  # the probe's loss reaches only the probe
        return loss, metrics

    def _token_score(
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
