"""Decode head samples only as far as the temperature sampler needs them (exact; paper §6, Alg. 2).

The batch approximation (paper Alg. 2, :func:`calm.generate.sampling.batch_temperature_select`) looks at
its N candidate chunks only through which of them are equal: its probabilities are a function of
each candidate's count c_x. So instead of decoding all N·K tokens (N = 200 candidates of K = 4
tokens through a 128k-vocabulary argmax, 95% of a step), :func:`lazy_batch_sample` refines a
partition of the candidates position by position: at position k it decodes token k only for
candidates whose group (same tokens at positions < k) still has another member, since a
candidate alone in its group is already distinct from all others. Selection then runs on the
group labels, which have exactly the counts of the full tuples, so it returns the same index for
the same generator state; only the chosen candidate's remaining tokens are decoded afterwards.
With random weights all N first tokens differ, so a step decodes N + K - 1 tokens instead of N·K;
a peaked trained model decodes more where candidates agree.

Each decoded token goes through ``Autoencoder.vocab_argmax`` (exact: the certified int8 screen of
``calm.models.vocab_search`` at large vocabularies), and the decoder trunk runs per position on
the rows that need it: the chunk-level layers and the expansion for all candidates, the
token-level layers (independent per token) only for the decoded tokens.

The exact sampler (paper Alg. 1) only ever asks whether two draws are equal (and, when its budget
runs out, which draw was most frequent). :class:`LazyChunks` gives it draws that decode their
tokens position by position as comparisons need them: two draws that differ in their first token,
the usual case, cost one token each instead of K.
"""

from __future__ import annotations

import torch

from calm.generate.sampling import batch_temperature_choice, batch_temperature_select
from calm.models import rng
from calm.models.autoencoder import Autoencoder
from calm.models.calm import ChunkDraws
from calm.models.vocab_search import vocab_argmax

__all__ = ["LazyChunk", "LazyChunks", "lazy_batch_sample", "reference_batch_sample", "reference_decode_ids"]


def _expanded(ae: Autoencoder, z: torch.Tensor) -> torch.Tensor:
    """z (..., l) -> the decoder's per-token states before the token-level layers (..., K, d)."""
    K, d = ae.config.chunk_size, ae.config.hidden_size
    return ae.expand_layer(ae.dec_chunk_layers(ae.latent_to_hidden(z))).reshape(*z.shape[:-1], K, d)


MIN_ROWS = 16
"""CPU fp32 matmuls of fewer rows take another kernel whose rounding differs in the last bit; padding to
this many rows keeps every decoded hidden state bit-identical to the full decode's in fp32 (4 sufficed
on AMD Zen 5; Intel AMX CPUs need 16). In bf16 on AMX CPUs the row count alone changes the kernel, so
there hidden states agree to bf16 rounding, not bit for bit."""


def _token_hidden(ae: Autoencoder, states: torch.Tensor) -> torch.Tensor:
    """(M, d) expanded token states -> (M, d) final hidden states (the token-level half of ``decode_hidden``)."""
    rows = states.shape[0]
    if 0 < rows < MIN_ROWS:
        states = torch.cat([states, states[:1].expand(MIN_ROWS - rows, -1)])
    return ae.dec_norm(ae.dec_token_layers(states))[:rows]


def _guess_choice(
    num_candidates: int, batch: int, temperature: float, generator: rng.Generators, device: torch.device
) -> torch.Tensor | None:
    """The index Alg. 2 picks if all N candidates turn out distinct (B,), drawn from a copy of the generator(s).

    That is the usual case at T < 1 for a model that is not peaked, so the chosen candidate's
    remaining tokens can be decoded in the same pass as everyone's first token. A wrong guess
    costs K - 1 extra rows in that pass and nothing else: the generator itself is not touched.
    None without an explicit generator.
    """
    if generator is None:
        return None
    distinct = torch.arange(num_candidates, device=device).expand(batch, num_candidates).unsqueeze(-1)
    return batch_temperature_select(distinct, temperature, rng.copy(generator))


def _refine(labels: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """Group ids (N, B) split by one more token column (N, B): equal new ids iff equal before and in the column."""
    pairs = torch.stack([labels, column], dim=-1).reshape(-1, 2)
    return torch.unique(pairs, dim=0, return_inverse=True)[1].reshape(labels.shape)


@torch.no_grad()
def lazy_batch_sample(
    ae: Autoencoder,
    draws: ChunkDraws,
    temperature: float,
    generator: rng.Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alg. 2 over N candidate draws per row (latents (N, B, l)) -> the chosen chunks (B, K), decoding lazily.

    Positions the model drew itself (``draws.prefix``, (N, B, p)) are taken as they are, not decoded.
    Returns exactly what :func:`reference_batch_sample` returns for the same generator state (module
    docstring), and leaves the generator in the same state: the chunks and the temperature each row
    was effectively sampled at ((B,) float64, :func:`~calm.generate.sampling.batch_effective_temperature`).
    """
    z = draws.latents
    num_candidates, batch = z.shape[:2]
    K = ae.config.chunk_size
    expanded = _expanded(ae, z)  # (N, B, K, d)
    tokens = torch.full((num_candidates, batch, K), -1, dtype=torch.long, device=z.device)
    labels = torch.arange(batch, device=z.device).expand(num_candidates, batch).contiguous()  # (N, B) group ids
    start = 0
    if draws.prefix is not None:
        start = draws.prefix.shape[-1]
        tokens[..., :start] = draws.prefix
        for k in range(start):
            labels = _refine(labels, draws.prefix[..., k])
    guess = _guess_choice(num_candidates, batch, temperature, generator, z.device)  # (B,) or None
    for k in range(start, K):
        _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        shared = counts[inverse] >= 2  # candidates that still have a twin
        if not bool(shared.any()):
            break
        n_idx, b_idx = shared.nonzero(as_tuple=True)
        k_idx = torch.full_like(n_idx, k)
        if k == start and guess is not None and k + 1 < K:  # the guessed choice's other tokens ride along
            rest = K - 1 - k
            rows = torch.arange(batch, device=z.device).repeat_interleave(rest)
            n_idx = torch.cat([n_idx, guess.repeat_interleave(rest)])
            b_idx = torch.cat([b_idx, rows])
            k_idx = torch.cat([k_idx, torch.arange(k + 1, K, device=z.device).repeat(batch)])
        tokens[n_idx, b_idx, k_idx] = ae.vocab_argmax(_token_hidden(ae, expanded[n_idx, b_idx, k_idx]))
        labels = _refine(labels, tokens[..., k])
    groups = labels.t().unsqueeze(-1)  # (B, N, 1): equal labels iff equal chunks
    choice, effective = batch_temperature_choice(groups, temperature, generator)  # (B,), (B,)
    rows = torch.arange(batch, device=z.device)
    chosen = tokens[choice, rows]  # (B, K), -1 where not decoded yet
    b_idx, k_idx = (chosen < 0).nonzero(as_tuple=True)
    if b_idx.numel():
        hidden = _token_hidden(ae, expanded[choice[b_idx], b_idx, k_idx])
        chosen[b_idx, k_idx] = ae.vocab_argmax(hidden)
    return chosen, effective


@torch.no_grad()
def reference_decode_ids(ae: Autoencoder, z: torch.Tensor) -> torch.Tensor:
    """z (..., l) -> (..., K) ids: every token decoded, as the library did before the lazy path."""
    h = ae.decode_hidden(z)
    return vocab_argmax(h.reshape(-1, h.shape[-1]), ae.embed_tokens.weight).view(h.shape[:-1])


@torch.no_grad()
def reference_batch_sample(
    ae: Autoencoder,
    draws: ChunkDraws,
    temperature: float,
    generator: rng.Generators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alg. 2 over draws (latents (N, B, l)) -> ((B, K) chunks, (B,) effective temperatures), decoding all N·K
    tokens: the lazy path's reference."""
    ids = draws.tokens(lambda z: reference_decode_ids(ae, z)).transpose(0, 1)  # (B, N, K)
    index, effective = batch_temperature_choice(ids, temperature, generator)
    return ids[torch.arange(ids.shape[0], device=ids.device), index], effective


class LazyChunks:
    """A batch of draws (latents (N, l)) whose K tokens are decoded one position at a time, on demand.

    Position k is decoded for the whole batch the first time any chunk's token k is asked for (one
    batched vocabulary pass), so comparing chunks that differ in their first token costs 1/K of a
    full decode.
    """

    def __init__(self, ae: Autoencoder, draws: ChunkDraws) -> None:
        self.ae = ae
        # the latents, not the (N, K, d) decoder states: a sampler that runs out of budget holds
        # its draws until the end, and the states are recomputed (bit-identically) per position
        self.z = draws.latents  # (N, l)
        self.columns: list[list[int] | None] = [None] * ae.config.chunk_size
        if draws.prefix is not None:  # (N, p): positions the model drew itself are known already
            for k in range(draws.prefix.shape[-1]):
                self.columns[k] = draws.prefix[:, k].tolist()

    def token(self, index: int, position: int) -> int:
        column = self.columns[position]
        if column is None:
            states = _expanded(self.ae, self.z)[:, position]
            column = self.columns[position] = self.ae.vocab_argmax(_token_hidden(self.ae, states)).tolist()
        return column[index]

    def chunk(self, index: int) -> LazyChunk:
        return LazyChunk(self, index)


class LazyChunk:
    """One chunk of a :class:`LazyChunks`: compares equal to another exactly when all K tokens agree,
    decoding positions in order only until they differ; hashes (and :meth:`tokens`) decode all K."""

    __slots__ = ("batch", "index")

    def __init__(self, batch: LazyChunks, index: int) -> None:
        self.batch, self.index = batch, index

    def tokens(self) -> tuple[int, ...]:
        return tuple(self.batch.token(self.index, k) for k in range(len(self.batch.columns)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LazyChunk):
            return NotImplemented
        positions = range(len(self.batch.columns))
        return all(self.batch.token(self.index, k) == other.batch.token(other.index, k) for k in positions)

    def __hash__(self) -> int:
        return hash(self.tokens())
