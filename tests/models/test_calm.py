"""CALM (paper §4): input compression, energy head, loss wiring, frozen autoencoder, generation and cache."""

import factories
import pytest
import torch

from calm.config import CALMConfig
from calm.generate.engine import generate, left_pad_to_chunks
from calm.models.calm import CALM


def test_head_output_is_zero_initialised_and_sampling_shapes():
    m = factories.tiny_calm()
    h = torch.randn(3, 32)
    z = m.head.sample(h, 5)
    assert z.shape == (5, 3, 8)
    assert torch.all(z == 0)  # zero-initialised last layer (paper §4.2)
    torch.nn.init.normal_(m.head.final_out.weight)
    z = m.head.sample(h, 5)
    assert z.std(0).mean() > 0  # samples differ: the noise reaches the output


def test_paper_parameter_counts():
    # the paper's vocabulary and latent size; the autoencoder's size is not counted
    ae = factories.tiny_autoencoder(vocab=128257, seed=None, hidden_size=16, intermediate_size=16, latent_size=128)
    cfg = CALMConfig(hidden_size=1024, intermediate_size=2752, num_layers=16, num_heads=16)
    with torch.device("meta"):
        m = CALM(cfg, ae)
    n = m.num_parameters()
    assert abs(n - 371.7e6) / 371.7e6 < 0.002, n  # CALM-M (paper Table 1)


def test_loss_trains_only_the_language_model():
    m = factories.tiny_calm()
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
    ae = factories.tiny_autoencoder(seed=None, chunk_size=8)
    cfg = factories.tiny_calm_config(K=4, max_seq_len=2048, num_samples=8, num_target_samples=100)  # else defaults
    with pytest.raises(ValueError, match="chunk_size=8 but the language model expects 4"):
        CALM(cfg, ae)


def _randomise_head(m):
    torch.manual_seed(1)
    torch.nn.init.normal_(m.head.final_out.weight, std=0.5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_generation_with_cache_equals_without(temperature):
    m = factories.tiny_calm().eval()
    _randomise_head(m)
    prompt = torch.randint(0, 50, (2, 8))
    kw = dict(temperature=temperature, num_samples=16)
    a = generate(m, prompt, 20, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    b = generate(m, prompt, 20, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a == b
    assert all(len(row) == 20 for row in a)


def test_generation_stops_at_eos_inside_a_chunk():
    m = factories.tiny_calm().eval()
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
    m = factories.tiny_calm().eval()
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(m, torch.zeros(1, 4 * 30, dtype=torch.long), 16)


def test_invalid_temperature_is_refused():
    m = factories.tiny_calm().eval()
    for t in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match="temperature"):
            generate(m, torch.zeros(1, 4, dtype=torch.long), 4, temperature=t)
