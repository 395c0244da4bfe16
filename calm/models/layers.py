"""Transformer layers shared by the CALM backbone and the token-level baseline.

Llama-style blocks as the paper uses them (§4, sizes in §7.1): pre-norm RMSNorm, rotary position
embeddings (θ = 10,000), multi-head attention (grouped-query optional) through
``F.scaled_dot_product_attention``, and a SwiGLU MLP, all without biases. A small KV cache makes
incremental decoding exact: decoding with the cache gives the same outputs as a full forward.
Nothing here knows about tokens, chunks or heads; the models assemble these pieces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from calm.config import TransformerConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability under bf16 autocast, as Llama does
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_frequencies(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_dim // 2) for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension, the HF Llama convention.

    x: (B, H, T, D); cos, sin: (T, D/2).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to ``max_len``.

    Layout per layer: (B, kv_heads, max_len, head_dim). ``length`` is the number of filled steps.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: {end} steps > max_len={self.max_len}; shorten the prompt or generation"
            )
        self.keys[layer][:, :, start:end] = k.to(self.keys[layer].dtype)
        self.values[layer][:, :, start:end] = v.to(self.values[layer].dtype)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def repeat_interleave(self, repeats: int) -> None:
        """Expand the batch dimension, e.g. to run several samples from one prompt."""
        self.keys = [k.repeat_interleave(repeats, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(repeats, dim=0) for v in self.values]


class RowKVCache:
    """Keys and values of a batch whose rows are at different lengths, for continuous batching.

    Each row is one sequence with its own length: a row joins with :meth:`add` (its prompt prefilled
    alone in a :class:`KVCache`) and leaves with :meth:`remove`, between decoding steps, while the
    other rows go on. The rows in use are always ``0 .. size - 1`` (a row that leaves is replaced by
    the last), so a step runs on ``[:size]`` with no gather. Row b's new keys go to its own next
    position, it attends to its own positions only (:meth:`attention_mask`) and its rotary
    positions continue from its own length (:meth:`positions`): a sequence computes what it computes
    alone, up to the rounding of batched matmuls. Storage grows (doubling) as rows and lengths need.
    Ours, not the paper's: the paper decodes one sequence at a time.
    """

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.device, self.dtype = torch.device(device), dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        self.size = 0

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, steps) the storage holds now."""
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def _reserve(self, rows: int, steps: int) -> None:
        have_rows, have_steps = self.capacity
        if rows <= have_rows and steps <= have_steps:
            return
        rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        steps = have_steps if steps <= have_steps else max(steps, 2 * have_steps)
        shape = (rows, self.kv_heads, steps, self.head_dim)
        for store in (self.keys, self.values):
            for i in range(self.num_layers):
                grown = torch.zeros(shape, device=self.device, dtype=self.dtype)
                if i < len(store):
                    grown[:have_rows, :, :have_steps] = store[i]
                    store[i] = grown
                else:
                    store.append(grown)
        lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        lengths[: self.lengths.shape[0]] = self.lengths
        self.lengths = lengths

    def add(self, cache: KVCache, max_len: int, source: int = 0, length: int | None = None) -> int:
        """Take row ``source`` of a prefilled ``cache``, its first ``length`` steps (default: all it holds), as
        a new row that may grow to ``max_len`` steps; returns its index. Prompts prefilled together, right-
        padded to one length with causal attention, each keep their own steps this way."""
        filled = cache.length if length is None else length
        if not 0 < filled <= cache.length:
            raise ValueError(f"length {filled} is not in 1..{cache.length}, the steps the cache holds")
        self._reserve(self.size + 1, max(max_len, filled))
        row = self.size
        for i in range(self.num_layers):
            self.keys[i][row, :, :filled] = cache.keys[i][source, :, :filled]
            self.values[i][row, :, :filled] = cache.values[i][source, :, :filled]
        self.lengths[row] = filled
        self.size += 1
        return row

    def remove(self, row: int) -> None:
        """Drop ``row``; the last row takes its index (callers that keep per-row state move theirs alike)."""
        if not 0 <= row < self.size:
            raise IndexError(f"row {row} is not in use (size {self.size})")
        last = self.size - 1
        if row != last:
            steps = int(self.lengths[last])
            for store in (self.keys, self.values):
                for layer in store:
                    layer[row, :, :steps] = layer[last, :, :steps]
            self.lengths[row] = self.lengths[last]
        self.lengths[last] = 0
        self.size = last

    def positions(self, steps: int) -> torch.Tensor:
        """Rotary positions (size, steps) of the next ``steps`` inputs of each row."""
        return self.lengths[: self.size, None] + torch.arange(steps, device=self.device)

    def attention_mask(self, steps: int) -> torch.Tensor:
        """(size, 1, steps, S) boolean, True where query t of row b may see key j: j <= length_b + t.

        S = the longest row's length + ``steps``, the span :meth:`update` returns.
        """
        span = int(self.lengths[: self.size].max()) + steps
        keys = torch.arange(span, device=self.device)
        return (keys <= self.positions(steps)[..., None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (size, kv_heads, steps, head_dim) at each row's next positions; return keys and values
        (size, kv_heads, S, head_dim) for :meth:`attention_mask`."""
        steps = k.shape[2]
        positions = self.positions(steps)  # (size, steps)
        if int(positions.max()) >= self.capacity[1]:
            raise ValueError(f"KV cache overflow: a row passed the {self.capacity[1]} steps it was added with")
        rows = torch.arange(self.size, device=self.device)[:, None]
        self.keys[layer][rows, :, positions] = k.transpose(1, 2).to(self.dtype)
        self.values[layer][rows, :, positions] = v.transpose(1, 2).to(self.dtype)
        span = int(positions.max()) + 1
        return self.keys[layer][: self.size, :, :span], self.values[layer][: self.size, :, :span]

    def advance(self, steps: int) -> None:
        self.lengths[: self.size] += steps


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length if attn_mask is None else 0
            k, v = cache.update(layer, k, v)
        if self.kv_heads != self.num_heads:
            rep = self.num_heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new query sees the whole cache
        else:
            # T new queries after `past` cached steps: query i sees keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None,
        layer: int,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, attn_mask)
        return x + self.mlp(self.mlp_norm(x))


class Backbone(nn.Module):
    """A stack of Blocks plus the final RMSNorm, fed with input embeddings (no token embedding).

    forward(x: (B, T, d), cache) -> (B, T, d). With a cache, positions continue from
    ``cache.length`` and the cache advances by T; with a :class:`RowKVCache`, each row's positions
    continue from its own length and it attends to its own keys only. ``positions`` (T,) and a boolean ``attn_mask``
    (T, cached + T) (True = may attend) describe any tree of sequences packed into one row; the
    BrierLM drivers use them to roll out every position's continuation in one pass over a cached
    teacher-forced prefix.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.checkpoint_blocks = False
        """Activation checkpointing: in training, each block's activations are recomputed in the backward
        pass instead of kept (``train.activation_checkpointing``)."""
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary tables, which no checkpoint holds; a model built on the meta device
        gets real ones this way after its weights are loaded (``calm.checkpoint.load_model``)."""
        c = self.config
        cos, sin = rope_frequencies(c.head_dim, c.max_seq_len, c.rope_theta)
        self.rope_cos, self.rope_sin = (cos, sin) if device is None else (cos.to(device), sin.to(device))

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        return KVCache(
            c.num_layers,
            batch_size,
            c.kv_heads,
            c.head_dim,
            max_len or c.max_seq_len,
            device=self.rope_cos.device,
            dtype=dtype or self.norm.weight.dtype,
        )

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | RowKVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = x.shape[1]
        if isinstance(cache, RowKVCache):  # rows at their own lengths (continuous batching)
            positions, attn_mask = cache.positions(T), cache.attention_mask(T)
        start = cache.length if isinstance(cache, KVCache) else 0
        last = int(positions.max()) + 1 if positions is not None else start + T
        if last > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {last} steps exceeds the context of {self.config.max_seq_len} steps; "
                "shorten the input or raise max_seq_len"
            )
        if positions is not None:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            if positions.dim() == 2:  # (B, T) positions: (B, 1, T, D/2) tables, broadcast over heads
                cos, sin = cos[:, None], sin[:, None]
        else:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, i, attn_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i, attn_mask)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """HF Llama initialisation: Linear and Embedding ~ N(0, std), biases 0, norms 1."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, (RMSNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
