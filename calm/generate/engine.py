"""The decoding loop for CALM: K tokens per step, with likelihood-free temperature (paper §6).

The engine knows nothing of text: it works on token ids. Each step the backbone's last hidden
state goes to the energy head; the head's sample(s) are decoded by the frozen autoencoder (argmax)
into a K-token chunk, which becomes the next input. Temperature T < 1 uses the batch
approximation (paper Alg. 2, N candidates) or the exact rejection sampler (Alg. 1); T = 1 takes
one head sample.

**Prompts whose length is not a multiple of K.** The official code right-pads the prompt with
PAD, which puts padding between the prompt and the continuation and feeds the model a token it
never saw in training. We instead *left*-pad with BOS: the prompt ``[BOS] + text`` becomes
``[BOS]*r + [BOS] + text`` with r = (−len) mod K. In training, chunk boundaries fall at arbitrary
offsets inside documents (chunks are aligned to the block, not to document starts, in the authors' code), so a
document's BOS appears at every offset of a chunk; the left pad keeps the last prompt token at the
end of a chunk, so the continuation starts right after it.

**Document ends.** ``generate`` stops a row at the first token of ``stop_ids`` (and ``eos_id``)
and drops it and the rest of its chunk.

Text in, text out (``generate_text``, ``complete``) and the rules a request must follow (the
temperatures CALM accepts, N >= 1, the sampler names, the room in the context) live one level up,
in :mod:`calm.generate.lm`, the interface CALM shares with the token-level baseline; it checks a
request before it reaches this loop. Called directly, the loop still refuses a prompt that does not
fit the context, and the samplers refuse a temperature outside (0, 1].
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Hashable
from typing import Any

import torch

from calm.generate.lazy_decode import (
    LazyChunk,
    LazyChunks,
    lazy_batch_sample,
    reference_batch_sample,
    reference_decode_ids,
)
from calm.generate.sampling import SamplingStats, exact_temperature_sample
from calm.models import rng


def left_pad_to_chunks(prompts: list[list[int]], chunk_size: int, pad_id: int) -> torch.Tensor:
    """Left-pad every prompt with ``pad_id`` to one common length that is a multiple of K."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start it with BOS)")
    longest = max(len(p) for p in prompts)
    length = -(-longest // chunk_size) * chunk_size
    return torch.tensor([[pad_id] * (length - len(p)) + list(p) for p in prompts], dtype=torch.long)


@torch.no_grad()
def sample_chunks(
    model: Any,
    h: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_samples: int = 200,
    sampler: str = "batch",
    generator: torch.Generator | None = None,
    max_attempts: int = 100_000,
    fast: bool = True,
) -> torch.Tensor:
    """Next chunk per row of h (B, d) -> (B, K) token ids.

    ``fast=False`` decodes every candidate in full, as the library did before the exact speed-ups
    (``calm.generate.lazy_decode``); the samples are the same for the same generator state.
    """
    return sample_step(
        model,
        h,
        temperature=temperature,
        num_samples=num_samples,
        sampler=sampler,
        generator=generator,
        max_attempts=max_attempts,
        fast=fast,
    )[0]


@torch.no_grad()
def sample_step(
    model: Any,
    h: torch.Tensor,
    *,
    temperature: float,
    num_samples: int,
    sampler: str,
    generator: rng.Generators,
    max_attempts: int = 100_000,
    fast: bool = True,
) -> tuple[torch.Tensor, list[float | None]]:
    """:func:`sample_chunks`, also returning the temperature each row was effectively sampled at.

    ``generator`` may be one generator per row of h (:mod:`calm.models.rng`): each row then gets the
    chunk it gets alone with its generator, which is how continuous batching keeps requests apart.

    A row's entry is a float (see :func:`calm.generate.sampling.batch_effective_temperature`; T for
    an exact sample) or None where the exact sampler ran out of draws and returned its most frequent
    draw. The chunks are the same as :func:`sample_chunks` gives for the same generator state.
    """
    ae = model.autoencoder
    decode_ids = ae.decode_ids if fast else lambda z: reference_decode_ids(ae, z)
    if temperature == 1.0:
        return model.sample_next(h, 1, generator)[0].tokens(decode_ids), [1.0] * h.shape[0]
    if sampler == "batch":
        batch_sample = lazy_batch_sample if fast else reference_batch_sample
        chunks, effective = batch_sample(ae, model.sample_next(h, num_samples, generator), temperature, generator)
        return chunks, effective.tolist()
    if sampler != "exact":
        raise ValueError(f"sampler must be 'batch' or 'exact', got {sampler!r}")

    def make_draw(row: torch.Tensor, generator: torch.Generator | None) -> Callable[[], Hashable]:
        buffer: list[Hashable] = []

        def draw() -> Hashable:
            if not buffer:  # draw head samples 64 at a time; each is an independent sample
                draws = model.sample_next(row, 64, generator)[:, 0]  # latents (64, l)
                if fast:  # tokens decoded only as far as comparisons need them
                    lazy = LazyChunks(ae, draws)
                    buffer.extend(lazy.chunk(i) for i in range(draws.latents.shape[0]))
                else:
                    buffer.extend(tuple(x) for x in draws.tokens(decode_ids).tolist())
            return buffer.pop()

        return draw

    rows, effective = [], []
    for b in range(h.shape[0]):
        row_generator = rng.of_row(generator, b)
        draw = make_draw(h[b : b + 1], row_generator)
        chunk, _, exhausted = exact_temperature_sample(
            draw, temperature, max_attempts=max_attempts, on_exhausted="fallback", rng=_stage_two_rng(row_generator)
        )
        chunk = chunk.tokens() if isinstance(chunk, LazyChunk) else chunk
        rows.append(torch.tensor(chunk, dtype=torch.long, device=h.device))
        effective.append(None if exhausted else temperature)
    return torch.stack(rows), effective


def _stage_two_rng(generator: torch.Generator | None) -> random.Random | None:
    """The exact sampler's stage-2 uniforms (1/T not an integer), seeded from ``generator`` so that a seeded
    request is reproducible; None (fresh entropy) without one."""
    if generator is None:
        return None
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
    return random.Random(int(seed))


@torch.no_grad()
def generate(
    model: Any,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    num_samples: int = 200,
    sampler: str = "batch",
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_chunk: Callable[[int, list[int]], None] | None = None,
    stop_ids: Collection[int] | None = None,
    fast: bool = True,
    stats: list[SamplingStats] | None = None,
) -> list[list[int]]:
    """Continue ``prompt`` (B, T), T a multiple of K, by up to ``max_new_tokens`` tokens per row.

    Returns the new tokens of each row. A row stops at the first token that is ``eos_id`` or in
    ``stop_ids`` (e.g. BOS and EOS: the end of a document); that token and the rest of its chunk
    are excluded. ``on_chunk(row, tokens)`` is called as each chunk is decoded, for streaming.
    ``use_cache=False`` recomputes the whole prefix each step (for testing cache equivalence).
    ``fast=False`` is the reference path of :func:`sample_chunks` (same samples, every candidate
    decoded). ``stats`` (one :class:`~calm.generate.sampling.SamplingStats` per row) is filled with
    how often each row's steps fell back from the temperature asked.
    """
    return generate_rows(
        model,
        prompt,
        max_new_tokens,
        temperature=temperature,
        num_samples=num_samples,
        sampler=sampler,
        stop_ids=_stop_set(eos_id, stop_ids),
        generator=generator,
        use_cache=use_cache,
        on_chunk=on_chunk,
        fast=fast,
        stats=stats,
    )[0]


def _stop_set(eos_id: int | None, stop_ids: Collection[int] | None) -> frozenset[int]:
    return frozenset(stop_ids or ()) | (frozenset() if eos_id is None else frozenset({eos_id}))


def keep_chunk(
    out: list[int], chunk: list[int], max_new_tokens: int, stop_ids: Collection[int]
) -> tuple[list[int], bool]:
    """Append to a row's new tokens ``out`` what it keeps of a sampled ``chunk``: no more than the room left
    under ``max_new_tokens``, and nothing from its first stop token on. Returns (the kept tokens, whether a
    stop token ended the row). The one rule of :func:`generate_rows` and of continuous batching."""
    chunk = chunk[: max_new_tokens - len(out)]
    cut = next((i for i, token in enumerate(chunk) if token in stop_ids), None)
    if cut is not None:
        chunk = chunk[:cut]
    out.extend(chunk)
    return chunk, cut is not None


def generate_rows(
    model: Any,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float,
    num_samples: int,
    sampler: str,
    stop_ids: frozenset[int],
    generator: torch.Generator | None,
    use_cache: bool,
    on_chunk: Callable[[int, list[int]], None] | None,
    fast: bool = True,
    stats: list[SamplingStats] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """:func:`generate`, also returning per row whether it ended at a stop token (else at the length).

    ``stop_ids`` is the full set of stop tokens; ``on_chunk`` as in :func:`generate`. ``stats``, one
    :class:`~calm.generate.sampling.SamplingStats` per row, counts each chunk a row keeps (rows that
    have finished are not counted), updated before ``on_chunk`` sees the chunk.
    """
    K = model.chunk_size
    B, T = prompt.shape
    if stats is not None and len(stats) != B:
        raise ValueError(f"stats needs one SamplingStats per prompt row ({B}); got {len(stats)}")
    if T % K != 0:
        raise ValueError(f"prompt length {T} is not a multiple of K={K}; use left_pad_to_chunks first")
    steps = -(-max_new_tokens // K)
    context = model.config.max_seq_len
    if T // K + steps - 1 > context:
        raise ValueError(
            f"prompt of {T // K} chunks plus {steps} new chunks exceeds the context of {context} steps; "
            "shorten the prompt or ask for fewer tokens"
        )
    device = next(model.parameters()).device
    chunks = prompt.to(device).view(B, T // K, K)
    cache = model.new_cache(B, max_len=T // K + steps) if use_cache else None
    h = model.hidden_states(chunks, cache)[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stopped = [False] * B
    for step in range(steps):
        nxt, effective = sample_step(
            model, h, temperature=temperature, num_samples=num_samples, sampler=sampler, generator=generator, fast=fast
        )
        for b, row in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if stats is not None:
                stats[b].record(effective[b])
            row, stopped[b] = keep_chunk(out[b], row, max_new_tokens, stop_ids)
            done[b] = stopped[b] or len(out[b]) >= max_new_tokens
            if on_chunk is not None and row:
                on_chunk(b, row)
        if all(done) or step == steps - 1:
            break
        if use_cache:
            h = model.hidden_states(nxt[:, None], cache)[:, -1]
        else:
            chunks = torch.cat([chunks, nxt[:, None]], dim=1)
            h = model.hidden_states(chunks)[:, -1]
    return out, stopped
