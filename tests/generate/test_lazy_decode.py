"""Lazy candidate decoding for Alg. 2 and the fast generation path: the same samples as the reference."""

from __future__ import annotations

import factories
import pytest
import torch

from calm.config import load_preset
from calm.generate.engine import generate, sample_chunks
from calm.generate.lazy_decode import _expanded, _token_hidden, lazy_batch_sample, reference_batch_sample
from calm.models.autoencoder import Autoencoder
from calm.models.calm import ChunkDraws


def _both(
    ae: Autoencoder, z: torch.Tensor, temperature: float, seed: int, first: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    g_lazy, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    draws = ChunkDraws(z, None if first is None else first[..., None])
    lazy, lazy_temperature = lazy_batch_sample(ae, draws, temperature, g_lazy)
    ref, ref_temperature = reference_batch_sample(ae, draws, temperature, g_ref)
    assert torch.equal(lazy_temperature, ref_temperature)  # the lazy groups have the full tuples' counts
    return lazy, ref, torch.rand(3, generator=g_lazy), torch.rand(3, generator=g_ref)


@pytest.mark.parametrize("temperature", [0.5, 1 / 3, 0.7, 0.25])
@pytest.mark.parametrize("distinct_latents", [3, 12, 64])
def test_lazy_selection_equals_the_reference(temperature: float, distinct_latents: int) -> None:
    """Candidates drawn from a few latents (so whole chunks repeat) and a 50-token vocabulary (so
    first tokens collide between different chunks): every seed must give the same chunk and leave
    the generator in the same state."""
    ae = factories.tiny_autoencoder().eval()
    gen = torch.Generator().manual_seed(distinct_latents)
    base = torch.randn(distinct_latents, 3, 8, generator=gen) * 3
    pick = torch.randint(0, distinct_latents, (64, 3), generator=gen)
    z = base[pick, torch.arange(3)]  # (N=64, B=3, l)
    for seed in range(20):
        lazy, ref, after_lazy, after_ref = _both(ae, z, temperature, seed)
        assert torch.equal(lazy, ref), seed
        assert torch.equal(after_lazy, after_ref)


@pytest.mark.parametrize("temperature", [0.5, 0.25])
def test_lazy_selection_with_drawn_first_tokens_equals_the_reference(temperature: float) -> None:
    """The anchored head (``token_anchor``) draws each candidate's first token: the chunks start with it,
    lazily or not, and candidates with one latent but different first tokens are different chunks."""
    ae = factories.tiny_autoencoder().eval()
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, 8, generator=gen) * 3
    z = base[torch.randint(0, 4, (64, 3), generator=gen), torch.arange(3)]  # (N=64, B=3, l): chunks repeat
    first = torch.randint(0, 3, (64, 3), generator=gen)  # and so do first tokens
    for seed in range(20):
        lazy, ref, after_lazy, after_ref = _both(ae, z, temperature, seed, first)
        assert torch.equal(lazy, ref), seed
        assert torch.equal(after_lazy, after_ref)
        assert all(int(lazy[b, 0]) in first[:, b].tolist() for b in range(3))


def test_lazy_decoding_decodes_first_tokens_then_only_the_choice() -> None:
    """Token 0 of every candidate plus the other K - 1 tokens of the candidate chosen if all are
    distinct (one pass), further tokens only where candidates still agree, then at most K - 1 tokens
    of the choice: far fewer than N·K (with all first tokens distinct, N + K - 1 in one pass)."""
    ae = factories.tiny_autoencoder(vocab=40_000).eval()
    decoded: list[int] = []
    original = ae.vocab_argmax

    def counting(hidden: torch.Tensor) -> torch.Tensor:
        decoded.append(hidden.shape[0])
        return original(hidden)

    ae.vocab_argmax = counting  # type: ignore[method-assign]
    z = torch.randn(100, 1, 8, generator=torch.Generator().manual_seed(0)) * 3
    lazy, ref, _, _ = _both(ae, z, 0.5, seed=0)
    assert torch.equal(lazy, ref)
    assert decoded[0] == 100 + 3 and decoded[-1] <= 3
    assert sum(decoded) < 2 * 100


@pytest.mark.parametrize(
    ("vocab", "temperature", "sampler"),
    [(v, t, "batch") for v in (50, 40_000) for t in (1.0, 0.5, 1 / 3)]  # plain vocabulary product, int8 screen
    # Alg. 1 only where chunks repeat (random 40k-token chunks never do, and it would exhaust its 100k
    # draws), and at integer 1/T only: its stage-2 uniforms are unseeded
    + [(50, 0.5, "exact")],
)
def test_fast_generation_equals_the_reference(vocab: int, temperature: float, sampler: str) -> None:
    model = factories.tiny_calm(vocab=vocab, head_std=0.5, head_seed=1).eval()
    prompt = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(2))
    kw = dict(temperature=temperature, num_samples=32, sampler=sampler)
    fast = generate(model, prompt, 24, generator=torch.Generator().manual_seed(5), **kw)
    ref = generate(model, prompt, 24, generator=torch.Generator().manual_seed(5), fast=False, **kw)
    assert fast == ref


@pytest.mark.parametrize(("temperature", "sampler"), [(1.0, "batch"), (0.5, "batch"), (0.5, "exact")])
def test_fast_generation_of_an_anchored_head_equals_the_reference(temperature: float, sampler: str) -> None:
    model = factories.tiny_calm(token_anchor=True, token_aux_weight=0.3, head_std=0.5, head_seed=1).eval()
    prompt = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(2))
    kw = dict(temperature=temperature, num_samples=32, sampler=sampler)
    fast = generate(model, prompt, 24, generator=torch.Generator().manual_seed(5), **kw)
    ref = generate(model, prompt, 24, generator=torch.Generator().manual_seed(5), fast=False, **kw)
    assert fast == ref


def test_fast_generation_equals_the_reference_in_bf16() -> None:
    model = factories.tiny_calm(vocab=40_000, head_std=0.5, head_seed=1).eval().to(torch.bfloat16)
    prompt = torch.randint(0, 40_000, (1, 8), generator=torch.Generator().manual_seed(3))
    fast = generate(model, prompt, 24, temperature=0.5, num_samples=64, generator=torch.Generator().manual_seed(6))
    ref = generate(
        model, prompt, 24, temperature=0.5, num_samples=64, generator=torch.Generator().manual_seed(6), fast=False
    )
    assert fast == ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_hidden_states_are_bit_identical_to_the_full_decode(dtype: torch.dtype) -> None:
    """Per-position decoding of any number of rows (few rows take another fp32 kernel) must give
    the very hidden states of ``decode_hidden`` over all candidates, at the paper's AE width. In bf16,
    Intel AMX kernels depend on the row count itself: there the states agree to bf16 rounding."""
    torch.manual_seed(0)
    ae = Autoencoder(load_preset("autoencoder", "paper", {"model.vocab_size": 1000}).model).eval().to(dtype)
    with torch.no_grad():
        z = torch.randn(200, 1, 128).to(dtype)
        full = ae.decode_hidden(z)  # (N, 1, K, d)
        expanded = _expanded(ae, z)
        for rows in (1, 2, 3, 4, 5, 15, 16, 17, 200):
            lazy = _token_hidden(ae, expanded[:rows, 0, 1])
            if dtype == torch.float32:
                assert torch.equal(lazy, full[:rows, 0, 1]), rows
            else:
                assert torch.allclose(lazy.float(), full[:rows, 0, 1].float(), rtol=2e-2, atol=2e-2), rows


def test_lazy_exact_sampler_decodes_less_and_samples_the_same() -> None:
    """Alg. 1 through lazily decoded draws: the same chunks for the same seed, fewer decoded tokens."""
    model = factories.tiny_calm(head_std=0.5, head_seed=1).eval()
    ae, head = model.autoencoder, model.head
    decoded: list[int] = []
    buffers: list[int] = []
    vocab_argmax, sample = ae.vocab_argmax, head.sample
    ae.vocab_argmax = lambda hidden: decoded.append(hidden.shape[0]) or vocab_argmax(hidden)  # type: ignore[method-assign]
    head.sample = lambda *a, **k: buffers.append(1) or sample(*a, **k)  # type: ignore[method-assign]
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    kw = dict(temperature=0.5, sampler="exact")
    fast = sample_chunks(model, h, generator=torch.Generator().manual_seed(8), **kw)
    assert 0 < sum(decoded) < 4 * 64 * len(buffers)  # a full decode: K tokens of 64 draws per buffer
    ref = sample_chunks(model, h, generator=torch.Generator().manual_seed(8), fast=False, **kw)
    assert torch.equal(fast, ref)
