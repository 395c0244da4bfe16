"""The paper's ablation switches change exactly what they claim (paper Table 2, Figs. 6-7, Tables 3-5).

Autoencoder: ``kl_mode`` off | plain | clipped, ``kl_weight`` β, DropToken / DropLatent off at rate
0, the latent-size rule. Energy loss: N, M and α reach the loss and are validated. Model input:
``continuous`` reads only the previous chunk's posterior mean, ``both`` reads tokens and latent.
"""

from __future__ import annotations

import math
from functools import partial

import factories
import pytest
import torch

import calm.models.heads as heads
from calm.config import ConfigError, latent_ablation_overrides, load_preset
from calm.models.autoencoder import Autoencoder, clipped_kl

tiny_ae = partial(factories.tiny_autoencoder, vocab=97)
"""The tiny autoencoder over 97 ids, seeded 0; keywords override AutoencoderConfig fields."""
tiny_calm = partial(factories.tiny_calm, vocab=97, max_seq_len=16)
"""The tiny CALM over 97 ids with a 16-step context, seeded 0; keywords override CALMConfig fields."""


# ---------------------------------------------------------------------------------------------
# autoencoder regularisers (Table 2, Fig. 6, Fig. 7)


@pytest.mark.parametrize("mode", ["off", "plain", "clipped"])
def test_kl_mode_sets_the_regulariser(mode):
    ae = tiny_ae(kl_mode=mode, kl_weight=0.25, token_dropout=0.0, latent_dropout=0.0).train()
    ids = torch.randint(0, 97, (3, 5, 4))
    torch.manual_seed(1)
    out = ae(ids)
    mu, log_std = ae.encode(ids)
    expected = {
        "off": torch.tensor(0.0),
        "plain": clipped_kl(mu, log_std, None).mean(),
        "clipped": clipped_kl(mu, log_std, 0.5).mean(),
    }[mode]
    torch.testing.assert_close(out.kl, expected)
    assert out.loss.item() == pytest.approx(out.ce.item() * 4 + 0.25 * expected.item(), rel=1e-5)
    if mode == "off":
        assert out.kl.item() == 0.0 and out.loss.item() == pytest.approx(out.ce.item() * 4, rel=1e-6)
    if mode == "clipped":
        assert out.kl.item() >= 0.5 * 8 - 1e-6  # every one of the 8 dims contributes at least λ_KL
    # the plain KL may fall under the clipped floor: a dim with KL below λ_KL is not lifted
    plain = clipped_kl(torch.zeros(1, 8), torch.zeros(1, 8), None)
    assert plain.item() == 0.0 and clipped_kl(torch.zeros(1, 8), torch.zeros(1, 8), 0.5).item() == 4.0


def test_kl_off_sends_no_gradient_to_log_sigma():
    ae = tiny_ae(kl_mode="off", token_dropout=0.0, latent_dropout=0.0).train()
    out = ae(torch.randint(0, 97, (2, 3, 4)))
    assert not out.kl.requires_grad  # nothing of the KL term reaches the weights


def test_kl_switch_validation():
    with pytest.raises(ConfigError, match="kl_mode='soft' is unknown; choose one of off, plain, clipped"):
        tiny_ae(kl_mode="soft")
    with pytest.raises(ConfigError, match="kl_weight must be >= 0"):
        tiny_ae(kl_weight=-1e-3)


def _encoder_inputs_and_decoder_latents(ae: Autoencoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    real_encode, real_decode, real_sample = ae.encode, ae.decode, ae.sample_posterior

    def encode(inputs):
        seen["inputs"] = inputs.clone()
        return real_encode(inputs)

    def sample_posterior(mu, log_std, generator=None):
        seen["z"] = real_sample(mu, log_std, generator)
        return seen["z"]

    def decode(z):
        seen["decoded"] = z.clone()
        return real_decode(z)

    ae.encode, ae.decode, ae.sample_posterior = encode, decode, sample_posterior
    ae.train()(ids)
    return seen["inputs"], seen["z"], seen["decoded"]


def test_droptoken_off_masks_no_input_and_droplatent_off_passes_z_unchanged():
    ids = torch.randint(1, 97, (4, 50, 4))
    inputs, z, decoded = _encoder_inputs_and_decoder_latents(tiny_ae(token_dropout=0.0, latent_dropout=0.0), ids)
    assert torch.equal(inputs, ids)  # DropToken off: every input id reaches the encoder
    assert torch.equal(decoded, z)  # DropLatent off: the decoder sees the posterior sample as drawn
    inputs, z, decoded = _encoder_inputs_and_decoder_latents(tiny_ae(token_dropout=0.3, latent_dropout=0.3), ids)
    masked = (inputs != ids).float().mean().item()
    assert 0.25 < masked < 0.35 and torch.all(inputs[inputs != ids] == 0)  # p = 0.3 -> id 0
    zeroed = decoded == 0
    assert 0.25 < zeroed.float().mean().item() < 0.35
    torch.testing.assert_close(decoded[~zeroed], z[~zeroed] / 0.7)  # inverted dropout


def test_latent_size_ablation_scales_both_dropouts_as_the_paper():
    for latent, p in ((32, 0.05), (64, 0.10), (128, 0.15), (256, 0.20)):
        overrides = latent_ablation_overrides(latent)
        assert overrides == {"model.latent_size": latent, "model.token_dropout": p, "model.latent_dropout": p}
        model = load_preset("autoencoder", "tiny", overrides).model
        assert (model.latent_size, model.token_dropout, model.latent_dropout) == (latent, p, p)
    with pytest.raises(ConfigError, match="latent_size must be an integer > 16"):
        latent_ablation_overrides(16)


# ---------------------------------------------------------------------------------------------
# energy loss knobs (Tables 3-4)


def test_energy_knobs_reach_the_loss(monkeypatch):
    seen = {}

    def spy(samples, targets, alpha):
        seen.update(n=samples.shape[0], m=targets.shape[0], alpha=alpha)
        zero = samples.sum(dim=(0, 2)) * 0  # (P,): the score's diversity and fidelity terms
        return zero, zero

    monkeypatch.setattr(heads, "energy_terms", spy)
    model = tiny_calm(num_samples=3, num_target_samples=7, energy_alpha=1.25)
    model(torch.randint(0, 97, (2, 16)))
    assert seen == {"n": 3, "m": 7, "alpha": 1.25}


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("energy_alpha", 0.0, "strictly proper only for 0 < alpha < 2"),
        ("energy_alpha", 2.0, "strictly proper only for 0 < alpha < 2"),
        ("energy_alpha", -1.0, "strictly proper only for 0 < alpha < 2"),
        ("num_samples", 1, "needs at least 2 model samples"),
        ("num_target_samples", 0, "num_target_samples must be >= 1"),
        ("flow_steps", 0, "flow_steps must be >= 1"),
    ],
)
def test_energy_and_head_knobs_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_calm(**{field: value})


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.75])
def test_valid_alphas_train(alpha):
    loss, _ = tiny_calm(energy_alpha=alpha).train()(torch.randint(0, 97, (2, 16)))
    loss.backward()
    assert math.isfinite(loss.item())


# ---------------------------------------------------------------------------------------------
# model input (Table 5)


def test_continuous_input_reads_only_the_posterior_mean():
    model = tiny_calm(input="continuous").eval()
    assert not hasattr(model, "embed_tokens") and not hasattr(model, "embed_proj")
    chunks = torch.randint(0, 97, (2, 3, 4))
    mu, _ = model.target_posterior(chunks)
    h = model.hidden_states(chunks)
    torch.testing.assert_close(h, model.hidden_states(chunks, latents=mu))
    other = torch.randint(0, 97, (2, 3, 4))
    torch.testing.assert_close(h, model.hidden_states(other, latents=mu))  # tokens unused given the latent
    torch.testing.assert_close(model.compress(chunks), model.latent_proj(mu))
    with torch.no_grad():
        model.autoencoder.hidden_to_latent.bias.add_(1.0)  # a different encoder: different inputs
    assert not torch.allclose(h, model.hidden_states(chunks))


def test_both_inputs_sum_tokens_and_latent_and_discrete_ignores_the_latent():
    both = tiny_calm(input="both").eval()
    chunks = torch.randint(0, 97, (2, 3, 4))
    mu, _ = both.target_posterior(chunks)
    B, L, K = chunks.shape
    tokens = both.embed_proj(both.embed_tokens(chunks).reshape(B, L, K * 32))
    torch.testing.assert_close(both.compress(chunks), tokens + both.latent_proj(mu))
    discrete = tiny_calm().eval()
    assert not hasattr(discrete, "latent_proj")
    h = discrete.hidden_states(chunks)
    with torch.no_grad():
        discrete.autoencoder.hidden_to_latent.bias.add_(1.0)
    torch.testing.assert_close(h, discrete.hidden_states(chunks))


def test_continuous_training_uses_the_encoder_once_for_inputs_and_targets():
    model = tiny_calm(input="continuous").train()
    torch.nn.init.normal_(model.head.final_out.weight)  # zero at init, which would block every gradient
    calls = []
    real = model.autoencoder.encode

    def encode(ids):
        calls.append(ids.shape)
        return real(ids)

    model.autoencoder.encode = encode
    loss, _ = model(torch.randint(0, 97, (2, 16)))
    assert calls == [(2, 4, 4)]  # all 4 chunks once: inputs are chunks 0..2, targets 1..3
    loss.backward()
    assert model.latent_proj.weight.grad.abs().sum() > 0
