"""The chunk autoencoder (paper §3): shapes, the clipped-KL arithmetic, and regularisers only in training."""

import math

import factories
import pytest
import torch

from calm.config import AutoencoderConfig, ConfigError
from calm.models.autoencoder import Autoencoder, clipped_kl

VOCAB = 97


def test_shapes_and_tied_projection():
    ae = factories.tiny_autoencoder(vocab=VOCAB)
    ids = torch.randint(0, VOCAB, (3, 5, 4))
    mu, log_std = ae.encode(ids)
    assert mu.shape == log_std.shape == (3, 5, 8)
    logits = ae.decode(mu)
    assert logits.shape == (3, 5, 4, VOCAB)
    # the output projection is the input embedding: changing it changes the logits accordingly
    h = ae.decode_hidden(mu)
    torch.testing.assert_close(logits, h @ ae.embed_tokens.weight.t())
    assert not any("lm_head" in n for n, _ in ae.named_parameters())


def test_paper_preset_parameter_count():
    ae = Autoencoder(AutoencoderConfig())  # the paper's 75M autoencoder with the Llama-3 vocabulary
    n = ae.num_parameters()
    assert abs(n - 75.8e6) / 75.8e6 < 0.005, n


def test_clipped_kl_arithmetic():
    mu = torch.tensor([[0.0, 2.0, 0.1]])
    log_std = torch.tensor([[0.0, 0.0, math.log(0.3)]])
    # per-dim KL: 0 -> clamped to 0.5; 0.5*4 = 2.0; 0.5*(0.01 + 0.09 - 1 - 2 log 0.3) = 0.7540
    expected = 0.5 + 2.0 + 0.5 * (0.01 + 0.09 - 1 - 2 * math.log(0.3))
    got = clipped_kl(mu, log_std, clamp=0.5)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # clamping is per element, not of the sum: the sum alone (2.754) would exceed 3 * 0.5 anyway
    assert clipped_kl(torch.zeros(1, 4), torch.zeros(1, 4), clamp=0.5).item() == pytest.approx(2.0)


def test_training_loss_is_ce_times_k_plus_beta_kl():
    ae = factories.tiny_autoencoder(vocab=VOCAB, token_dropout=0.0, latent_dropout=0.0)
    ids = torch.randint(0, VOCAB, (2, 3, 4))
    ae.train()
    out = ae(ids)
    assert out.loss.item() == pytest.approx(out.ce.item() * 4 + 1e-3 * out.kl.item(), rel=1e-5)
    ae.eval()
    out = ae(ids)
    assert out.loss.item() == pytest.approx(out.ce.item(), rel=1e-6)


def test_dropouts_active_only_in_training():
    ae = factories.tiny_autoencoder(vocab=VOCAB, token_dropout=0.5, latent_dropout=0.5)
    ids = torch.randint(1, VOCAB, (4, 50, 4))
    seen = {}

    def spy_encode(inputs, _orig=ae.encode):
        seen["inputs"] = inputs.clone()
        return _orig(inputs)

    ae.encode = spy_encode
    ae.train()
    ae(ids)
    dropped = (seen["inputs"] == 0).float().mean().item()
    assert 0.4 < dropped < 0.6, dropped  # DropToken p=0.5 replaces ids by drop_token_id=0
    ae.eval()
    ae(ids)
    assert torch.equal(seen["inputs"], ids)

    # DropLatent: in training some latent coordinates are exactly zero before decoding
    captured = {}
    orig_decode = Autoencoder.decode

    def spy_decode(z):
        captured["z"] = z.clone()
        return orig_decode(ae, z)

    ae.decode = spy_decode
    ae.train()
    ae(ids)
    assert (captured["z"] == 0).float().mean().item() > 0.3
    ae.eval()
    ae(ids)
    assert (captured["z"] == 0).float().mean().item() == 0.0


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="chunk_size"):
        factories.autoencoder_config(vocab_size=VOCAB, chunk_size=0).validate()
    with pytest.raises(ConfigError, match="token_dropout"):
        factories.autoencoder_config(vocab_size=VOCAB, token_dropout=1.5).validate()
