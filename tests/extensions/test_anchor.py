"""The energy head anchored on a discrete first token (ours, ``model.token_anchor``; docs/guides/extensions.md,
docs/research/small-calm.md).

p(chunk | h) = softmax(readout(h))[t₁] · p(z | h, t₁): the first token comes from the readout, the latent
from the energy head conditioned on h and t₁. These tests check the parts with known answers: the
readout's categorical draw, the conditioning on t₁, teacher forcing in the loss, the FLOPs of the readout,
and the config's refusals. The generic head contract (generation with and without the KV cache, both
temperature samplers, BrierLM rollouts, checkpoints, FLOPs) runs in ``tests/models/test_heads.py`` as the
``anchored`` variant, learnability in ``tests/models/test_head_learnability.py``.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import factories
import pytest
import torch
import torch.nn.functional as F

from calm.config import ConfigError
from calm.eval.brier import calm_block_brier
from calm.extensions.anchor import AnchoredEnergyHead
from calm.generate.engine import generate, sample_chunks
from calm.models.flops import calm_flops

VOCAB, D = 50, 32


def anchored(**kw) -> torch.nn.Module:
    model = factories.tiny_calm(vocab=VOCAB, token_anchor=True, token_aux_weight=0.3, **kw).eval()
    # a trained-looking head: at init the blocks add ~1e-7 to the residual and the output layer is zero
    gen = torch.Generator().manual_seed(3)
    for name, p in model.head.named_parameters():
        if name.startswith(("blocks.", "final_out.")) and p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3, generator=gen)
    return model


class Certain(torch.nn.Module):
    """A readout that puts all mass on one token, whatever h."""

    def __init__(self, token: int) -> None:
        super().__init__()
        self.token = token

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.one_hot(torch.tensor(self.token), VOCAB).float().mul(1e4).expand(*h.shape[:-1], VOCAB)


def _readout_with_probs(head: AnchoredEnergyHead, probs: dict[int, float]) -> torch.Tensor:
    """Set the readout so that h = e₀ gives softmax = ``probs`` (others ~0); returns that h (D,)."""
    logits = torch.full((VOCAB,), -1e4)
    for token, p in probs.items():
        logits[token] = math.log(p)
    with torch.no_grad():
        head.token_readout.weight.zero_()
        head.token_readout.weight[:, 0] = logits
    return F.one_hot(torch.tensor(0), D).float()


def test_first_tokens_follow_the_readouts_inverse_cdf_and_sample_its_distribution():
    head = anchored().head
    h = _readout_with_probs(head, {7: 0.2, 11: 0.8})
    u = torch.tensor([0.0, 0.19, 0.21, 0.999])
    assert head.first_tokens(h, u).tolist() == [7, 7, 11, 11]
    # sample() draws the same categorical: token 7 about 20% of the time, nothing else but 7 and 11
    seen = []
    real = head.latent
    head.latent = lambda hs, noise, tokens: (seen.append(tokens), real(hs, noise, tokens))[1]
    z = head.sample(h.expand(4, D), 500, torch.Generator().manual_seed(0))
    head.latent = real
    tokens = seen[0]
    assert z.shape == (500, 4, 8) and tokens.shape == (500, 4)
    assert set(tokens.unique().tolist()) == {7, 11}
    assert abs((tokens == 7).float().mean().item() - 0.2) < 0.03  # 2000 draws: SE 0.009


@pytest.mark.parametrize(("temperature", "sampler"), [(1.0, "batch"), (0.5, "batch"), (0.5, "exact")])
@pytest.mark.parametrize("fast", [True, False])
def test_every_chunk_starts_with_the_drawn_token(temperature, sampler, fast):
    """Generation, both temperature samplers and BrierLM emit chunks whose first token is the readout's
    draw, whatever the latent's first position decodes to."""
    model = anchored()
    model.head.token_readout = Certain(7)
    h = torch.randn(D)
    assert (model.autoencoder.decode_ids(model.head.sample(h[None], 64))[..., 0] != 7).any()  # the latents alone
    assert (model.draw_chunks(h[None], 64)[..., 0] == 7).all()
    prompt = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    out = generate(
        model, prompt, 16, temperature=temperature, sampler=sampler, num_samples=16, fast=fast,
        generator=torch.Generator().manual_seed(4),
    )  # fmt: skip
    assert all(row[::4] == [7] * 4 for row in out)


def test_brier_of_an_anchored_model_scores_its_chunks_first_tokens():
    model = anchored()
    model.head.token_readout = Certain(7)
    block = torch.randint(8, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    block[0, ::4] = 7  # every chunk starts with 7: certain and right, so Brier-1 = 2·1 − 1 = 1 everywhere
    est = calm_block_brier(model, block, generator=torch.Generator().manual_seed(0))
    assert torch.all(est[:, 0] == 1)


def test_brier_of_an_anchored_model_does_not_see_the_target_it_scores():
    """The leak test: the readout is certain of a token no target chunk starts with. A correct evaluator draws
    both samples from the model: Brier-1 = 2·P(y) − Σ P(x)² = 2·0 − 1 = −1 at every position. One that copies
    the target's first token into the samples scores 1 + 1 − 1 = 1 there, one that draws a single sample and
    compares it with the target 0; neither passes."""
    model = anchored()
    model.head.token_readout = Certain(7)
    block = torch.randint(8, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))  # 7 appears nowhere
    est = calm_block_brier(model, block, generator=torch.Generator().manual_seed(0))
    assert est.shape == (9, 4) and torch.all(est[:, 0] == -1)
    assert torch.all(est[:, 1:] <= 0)  # no longer n-gram can match a target whose first token it misses


def _alg2_first_token_marginal(probs: dict[int, float], num_samples: int) -> dict[int, float]:
    """Algorithm 2 at T = 1/2 by enumeration: over every sequence of ``num_samples`` candidate first tokens,
    the chosen tuple has weight C(c, 2) among tuples seen at least twice (weight c among all if none is)."""
    marginal = dict.fromkeys(probs, 0.0)
    for draws in itertools.product(probs, repeat=num_samples):
        p = math.prod(probs[t] for t in draws)
        counts = Counter(draws)
        weights = {t: math.comb(c, 2) for t, c in counts.items()}
        if not any(weights.values()):
            weights = dict(counts)
        total = sum(weights.values())
        for t, w in weights.items():
            marginal[t] += p * w / total
    return marginal


@pytest.mark.parametrize("sampler", ["exact", "batch"])
def test_temperature_tempers_the_anchored_first_token_with_the_rest_of_the_chunk(sampler):
    """The exact first-token marginal at T = 1/2 (paper §6) of an anchored model whose latent, and so the rest
    of its chunk, is the same whatever the first token: the chunk's probability is the readout's p(t₁), so
    Alg. 1 must give p(t₁)² / Σ p², and Alg. 2 with N = 4 candidates its enumerated marginal (above). A
    sampler that tempers only the latent and draws t₁ at T = 1 gives p(t₁) = (0.5, 0.3, 0.2) and fails."""
    probs = {7: 0.5, 11: 0.3, 13: 0.2}
    model = factories.tiny_calm(vocab=VOCAB, token_anchor=True, token_aux_weight=0.3).eval()  # z = 0: zero init
    h = _readout_with_probs(model.head, probs)
    rows = 3000
    gen = torch.Generator().manual_seed(0)
    chunks = sample_chunks(model, h.expand(rows, D), temperature=0.5, num_samples=4, sampler=sampler, generator=gen)
    assert (chunks[:, 1:] == chunks[0, 1:]).all()  # the rest of the chunk does not depend on t₁
    if sampler == "exact":
        norm = sum(p * p for p in probs.values())
        expected = {t: p * p / norm for t, p in probs.items()}  # 0.658, 0.237, 0.105
    else:
        expected = _alg2_first_token_marginal(probs, num_samples=4)
    assert abs(sum(expected.values()) - 1) < 1e-12
    for token, q in expected.items():
        seen = (chunks[:, 0] == token).float().mean().item()
        se = math.sqrt(q * (1 - q) / rows)
        assert abs(seen - q) < 4 * se, (token, seen, q)  # 3000 rows: 4 SE <= 0.035, tempering only the latent: 0.16
    assert set(chunks[:, 0].tolist()) <= set(probs)


def test_a_token_of_probability_zero_is_never_drawn_even_from_bf16_noise():
    head = anchored().head
    h = _readout_with_probs(head, {3: 0.5, 5: 0.5})
    assert head.first_tokens(h, torch.tensor([0.0, 0.5, 1.0])).tolist() == [3, 5, 5]  # u = 1: the last token with mass
    noise = torch.full((8, head.noise_size), 0.4999).to(torch.bfloat16)  # rounds to 0.5: u = 1 exactly
    seen = []
    real = head.latent
    head.latent = lambda hs, n, t: (seen.append(t), real(hs, n, t))[1]
    head.to(torch.bfloat16)(h.expand(8, D).to(torch.bfloat16), noise)  # a bf16 model: the noise arrives in bf16
    head.latent = real
    assert seen[0].tolist() == [5] * 8


def test_token_score_and_token_anchor_together_are_refused():
    with pytest.raises(ConfigError, match="token_score_weight scores the latent's own first token"):
        factories.tiny_calm(token_anchor=True, token_aux_weight=0.3, token_score_weight=0.5)


def test_the_latent_depends_on_the_first_token_and_forward_is_a_function_of_its_noise():
    head = anchored().head
    h = torch.randn(6, D, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(6, head.noise_size, generator=torch.Generator().manual_seed(2)) - 0.5
    assert head.noise_size == head.config.noise_size + 1
    z = head(h, noise)
    assert torch.equal(z, head(h, noise))  # common random numbers for calm.eval.diagnostics
    tokens = head.first_tokens(h, noise[:, -1:] + 0.5)[:, 0]
    torch.testing.assert_close(z, head.latent(h, noise[:, :-1], tokens))
    other = head.latent(h, noise[:, :-1], (tokens + 1) % VOCAB)
    assert (other - z).norm(dim=-1).min() > 1e-3  # another first token, another latent


def test_loss_teacher_forces_the_true_first_token_and_adds_the_readouts_cross_entropy():
    model = anchored().train()
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    first = tokens.view(2, 4, 4)[:, 1:, 0].reshape(-1)
    seen = []
    real = model.head.latent
    model.head.latent = lambda hs, noise, t: (seen.append(t), real(hs, noise, t))[1]
    torch.manual_seed(1)
    loss, metrics = model(tokens)
    model.head.latent = real
    assert len(seen) == 1 and all(torch.equal(row, first) for row in seen[0])  # every sample, the true token
    h = model.hidden_states(tokens.view(2, 4, 4)[:, :-1]).reshape(-1, D)
    ce = F.cross_entropy(model.head.token_readout(h), first)
    torch.testing.assert_close(metrics["token_aux_loss"], ce.detach())
    torch.testing.assert_close(loss.detach(), metrics["energy_loss"] + 0.3 * ce.detach())
    loss.backward()
    assert model.head.token_readout.weight.grad.abs().sum() > 0
    assert model.head.token_embd.weight.grad[first].abs().sum() > 0  # only the true tokens' rows are used
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[first] = False
    assert model.head.token_embd.weight.grad[unused].abs().sum() == 0
    assert not hasattr(model, "token_aux_head")  # the readout is the head's own, used at sampling


def test_the_per_token_latent_offset_learns_from_the_first_step():
    """At init the trunk's output layer is zero, so no gradient reaches its inputs; the offsets get one at once."""
    model = factories.tiny_calm(vocab=VOCAB, token_anchor=True, token_aux_weight=0.3).train()
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    first = tokens.view(2, 4, 4)[:, 1:, 0].reshape(-1).unique()
    assert model.head.token_latent.weight.abs().sum() == 0
    model(tokens)[0].backward()
    assert model.head.token_embd.weight.grad.abs().sum() == 0
    grad = model.head.token_latent.weight.grad
    unused = torch.ones(VOCAB, dtype=torch.bool)
    unused[first] = False
    assert (grad[first].norm(dim=-1) > 0).all() and grad[unused].abs().sum() == 0


def test_the_readout_counts_in_parameters_and_in_flops_once_per_step():
    plain = factories.tiny_calm(vocab=VOCAB, token_aux_weight=0.3)
    model = anchored()
    # the readout (d·V), the token embedding (V·d) and its LayerNorm (2d), the latent offsets (V·l) are
    # part of the generating model
    assert model.num_parameters() - plain.num_parameters() == 2 * D * VOCAB + 2 * D + VOCAB * 8
    a, b = (calm_flops(m.config, m.autoencoder.config, num_samples_inference=200) for m in (model, plain))
    assert a["breakdown"]["inference_per_step"]["token_readout"] == 2 * D * VOCAB  # once, not 200 times
    assert a["inference_flops_per_token"] - b["inference_flops_per_token"] == 2 * D * VOCAB / 4
    assert a["train_forward_flops_per_step"] == b["train_forward_flops_per_step"]  # the aux readout already ran


@pytest.mark.parametrize(
    "overrides",
    [
        {"token_aux_weight": 0.0},
        {"token_aux_weight": 0.3, "token_aux_tokens": 2},
        {"token_aux_weight": 0.3, "head": "flow"},
    ],
)
def test_token_anchor_without_a_trained_readout_or_on_another_head_is_refused(overrides):
    with pytest.raises(ConfigError, match="token_anchor needs the energy head and its readout trained"):
        factories.tiny_calm(token_anchor=True, **overrides)
