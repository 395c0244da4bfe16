"""CALM: input compression, energy head, loss wiring, frozen autoencoder, generation and cache."""

import factories
import pytest
import torch

from calm.config import AutoencoderConfig, CALMConfig
from calm.generate.engine import generate, left_pad_to_chunks
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM


def tiny_calm(K=4, latent=8, vocab=50, seed=0) -> CALM:
    return factories.tiny_calm(vocab=vocab, K=K, latent=latent, seed=seed)


def test_head_output_is_zero_initialised_and_sampling_shapes():
    m = tiny_calm()
    h = torch.randn(3, 32)
    z = m.head.sample(h, 5)
    assert z.shape == (5, 3, 8)
    assert torch.all(z == 0)  # zero-initialised last layer (CALM-SPEC §3.3)
    torch.nn.init.normal_(m.head.final_out.weight)
    z = m.head.sample(h, 5)
    assert z.std(0).mean() > 0  # samples differ: the noise reaches the output


def test_paper_parameter_counts():
    ae = Autoencoder(AutoencoderConfig(hidden_size=16, intermediate_size=16))  # AE size is not counted
    cfg = CALMConfig(hidden_size=1024, intermediate_size=2752, num_layers=16, num_heads=16)
    with torch.device("meta"):
        m = CALM(cfg, ae)
    n = m.num_parameters()
    assert abs(n - 371.7e6) / 371.7e6 < 0.002, n  # CALM-M (CALM-SPEC §3.1)


def test_loss_trains_only_the_language_model():
    m = tiny_calm()
    m.train()
    assert not m.autoencoder.training  # frozen AE stays in eval mode
    tokens = torch.randint(0, 50, (2, 16))
    loss, metrics = m(tokens)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in m.autoencoder.parameters())
    assert m.head.final_out.weight.grad is not None and m.embed_proj[0].weight.grad is not None
    assert set(metrics) >= {"energy_loss", "sample_dist"}


def test_mismatched_autoencoder_is_refused():
    ae = Autoencoder(
        AutoencoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, latent_size=8, chunk_size=8)
    )
    cfg = CALMConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        chunk_size=4,
        latent_size=8,
    )
    with pytest.raises(ValueError, match="chunk_size=8 but the language model expects 4"):
        CALM(cfg, ae)


def _randomise_head(m):
    torch.manual_seed(1)
    torch.nn.init.normal_(m.head.final_out.weight, std=0.5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_generation_with_cache_equals_without(temperature):
    m = tiny_calm().eval()
    _randomise_head(m)
    prompt = torch.randint(0, 50, (2, 8))
    kw = dict(temperature=temperature, num_samples=16)
    a = generate(m, prompt, 20, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    b = generate(m, prompt, 20, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a == b
    assert all(len(row) == 20 for row in a)


def test_generation_stops_at_eos_inside_a_chunk():
    m = tiny_calm().eval()
    _randomise_head(m)
    prompt = torch.randint(0, 50, (1, 8))
    free = generate(m, prompt, 24, generator=torch.Generator().manual_seed(5))[0]
    eos = free[5]  # a token the model emits at position 5 (inside the second chunk)
    first = free.index(eos)
    cut = generate(m, prompt, 24, generator=torch.Generator().manual_seed(5), eos_id=eos)[0]
    assert cut == free[:first]


def test_left_padding_keeps_the_prompt_at_the_end():
    padded = left_pad_to_chunks([[7, 1, 2, 3, 4], [7, 9]], chunk_size=4, pad_id=7)
    assert padded.tolist() == [[7, 7, 7, 7, 1, 2, 3, 4], [7, 7, 7, 7, 7, 7, 7, 9]]


def test_prompt_longer_than_context_is_refused():
    m = tiny_calm().eval()
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(m, torch.zeros(1, 4 * 30, dtype=torch.long), 16)


def test_invalid_temperature_is_refused():
    m = tiny_calm().eval()
    for t in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match="temperature"):
            generate(m, torch.zeros(1, 4, dtype=torch.long), 4, temperature=t)
