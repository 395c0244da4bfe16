"""The token-level baseline: shapes, exact cached decoding, parameter count (paper §7.1, Table 1)."""

import factories
import pytest
import torch

from calm.config import GPTConfig
from calm.models.gpt import GPT


@pytest.fixture
def model() -> GPT:
    return factories.tiny_gpt(max_seq_len=64, init_std=0.2).eval()


def test_shapes_and_loss(model: GPT) -> None:
    ids = torch.randint(0, 50, (3, 10))
    assert model(ids).shape == (3, 10, 50)
    loss, metrics = model.loss(ids)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert int(metrics["tokens"]) == 3 * 9
    # the loss is next-token CE on shifted labels
    logits = model(ids)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    labels = ids.clone()
    labels[:, 5:] = -100
    _, metrics = model.loss(ids, labels)
    assert int(metrics["tokens"]) == 3 * 4


def test_lm_head_is_untied(model: GPT) -> None:
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    assert model.num_parameters() - model.num_parameters(non_embedding=True) == 50 * 32


def test_cached_decoding_matches_full_forward(model: GPT) -> None:
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        pieces = [model(ids[:, :5], cache)]  # a multi-token prefix, then one token at a time,
        pieces.append(model(ids[:, 5:8], cache))  # then a multi-token step after a prefix
        pieces += [model(ids[:, t : t + 1], cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def _greedy_from_scratch(model: GPT, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    out = prompt
    for _ in range(steps):
        out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def test_greedy_generate_with_cache_matches_recompute(model: GPT) -> None:
    prompt = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        expected = _greedy_from_scratch(model, prompt, 10)
    torch.testing.assert_close(model.generate(prompt, 10, temperature=0.0), expected, rtol=0, atol=0)


def test_sampled_generate_is_reproducible_and_stops_at_eos(model: GPT) -> None:
    prompt = torch.randint(0, 50, (4, 3))
    a = model.generate(prompt, 8, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 11) and torch.equal(a, b)
    # pick as EOS the token the first sequence emits first: it must then emit only EOS
    eos = int(a[0, 3])
    c = model.generate(prompt, 8, generator=torch.Generator().manual_seed(1), eos_id=eos)
    assert torch.equal(c[0, 3:], torch.full_like(c[0, 3:], eos))
    with pytest.raises(ValueError, match="exceeds the context"):
        model.generate(prompt, 100)


def test_s_preset_parameter_count() -> None:
    config = GPTConfig(
        vocab_size=128257,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=16,
        max_seq_len=2048,
    )
    with torch.device("meta"):  # count without allocating 1 GB
        model = GPT(config)
    assert model.num_parameters() == pytest.approx(282.0e6, rel=2e-3)
