"""The token-level baseline: a Llama-style causal language model (paper §7.1).

It matches HF ``LlamaForCausalLM`` as the official ``train_ar.py`` uses it: token embedding ->
``Backbone`` (pre-norm blocks with RoPE, MHA and SwiGLU, then the final RMSNorm) -> an *untied*
``lm_head``. With the S preset (12 layers, d = 768, FFN 2048, 16 heads, V = 128,257) it has
282.0M parameters (Table 1: "281M").

``generate`` decodes with the KV cache of ``calm.models.layers``; decoding with the cache gives the
same logits as re-running the whole sequence, which the tests check.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import GPTConfig
from calm.models import rng
from calm.models.layers import Backbone, KVCache, init_weights


def sample_tokens(logits: torch.Tensor, temperature: float, generator: rng.Generators = None) -> torch.Tensor:
    """The next token of each row of logits (B, V) -> (B,): the argmax at ``temperature`` 0, else a draw from
    softmax(logits / T) (``rng.categorical``; one generator per row allowed). :meth:`GPT.generate` and
    continuous batching both sample with it, so a row draws the same token alone and in a batch."""
    if temperature == 0:
        return logits.argmax(-1)
    return rng.categorical(F.softmax(logits.float() / temperature, dim=-1), generator)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # untied
        init_weights(self, config.init_std)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` tokens (default: context)."""
        return self.backbone.new_cache(batch_size, max_len, dtype)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """ids (B, T) -> next-token logits (B, T, V). With a cache, ``ids`` continue the cached prefix."""
        h = self.backbone(self.embed_tokens(ids), cache)  # (B, T, d)
        return self.lm_head(h)

    def last_logits(
        self, ids: torch.Tensor, cache: KVCache | None = None, last: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits (B, V) after each row of ids (B, T): at position ``last`` (B,) of each row (default
        T - 1), the LM head run on those positions only (a prompt's other positions need no logits)."""
        h = self.backbone(self.embed_tokens(ids), cache)  # (B, T, d)
        at = h[:, -1] if last is None else h[torch.arange(h.shape[0], device=h.device), last]
        return self.lm_head(at)

    def loss(
        self, ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean next-token cross-entropy: position t predicts ``labels[:, t + 1]``.

        ``labels`` defaults to ``ids`` (the HF ``run_clm`` packing: labels = inputs, shifted inside
        the loss); label -100 is ignored. Returns (loss, metrics) with detached metric tensors.
        """
        labels = ids if labels is None else labels
        logits = self(ids)[:, :-1]  # (B, T-1, V)
        targets = labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        tokens = (targets != -100).sum()
        return ce, {"ce": ce.detach(), "tokens": tokens.detach()}

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
        stop_ids: Collection[int] | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``prompt_ids`` (B, T); returns (B, T + new).

        ``temperature`` 0 decodes greedily (argmax). A sequence that emits ``eos_id`` or a token of
        ``stop_ids`` (e.g. BOS and EOS, the end of a document) keeps emitting that token; generation
        stops early once every sequence has, so the output may be shorter. ``on_token(row, id)`` is
        called for each new token before a row's stop token, for streaming.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        B, T = prompt_ids.shape
        total = T + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the context of "
                f"{self.config.max_seq_len}; shorten the prompt or generate fewer tokens"
            )
        stops = sorted(set(stop_ids or ()) | ({eos_id} if eos_id is not None else set()))
        stop_tensor = torch.tensor(stops, dtype=torch.long, device=prompt_ids.device)
        cache = self.new_cache(B, max_len=total)
        out = prompt_ids
        logits = self.last_logits(prompt_ids, cache)  # (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
        last = torch.zeros(B, dtype=torch.long, device=prompt_ids.device)  # the stop token of a finished row
        for step in range(max_new_tokens):
            nxt = sample_tokens(logits, temperature, generator)
            nxt = torch.where(done, last, nxt)
            newly = ~done & torch.isin(nxt, stop_tensor)
            if on_token is not None:
                for row in (~done & ~newly).nonzero()[:, 0].tolist():
                    on_token(row, int(nxt[row]))
            last = torch.where(newly, nxt, last)
            done = done | newly
            out = torch.cat([out, nxt[:, None]], dim=1)
            if (stops and bool(done.all())) or step == max_new_tokens - 1:
                break
            logits = self(nxt[:, None], cache)[:, -1]
        return out

    def num_parameters(self, non_embedding: bool = False) -> int:
        """All parameters; ``non_embedding`` leaves out the input embedding table (a lookup, no FLOPs).

        The untied ``lm_head`` is always counted: it is a matmul on every token (Table 1's accounting).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
        return n
