"""The options beyond the paper stay out of the paper's model: calm.models.CALM refuses them, build_calm picks
the extended model only when a config turns one on, and an option that changes only the loss changes nothing
else (initial weights, samples, the logged paper score)."""

from __future__ import annotations

import re
from pathlib import Path

import factories
import pytest
import torch

from calm.config import EXTENSION_FIELDS, AutoencoderConfig, CALMConfig, ConfigError, extensions_in_use
from calm.extensions import ExtendedCALM, build_calm
from calm.extensions.energy import ShapedEnergyHead
from calm.models.calm import CALM
from calm.models.heads import EnergyHead

MODELS = Path(__file__).resolve().parents[2] / "calm" / "models"


def test_extensions_in_use_names_switches_and_their_companions_only_when_on():
    assert extensions_in_use(CALMConfig()) == [] and extensions_in_use(AutoencoderConfig()) == []
    assert extensions_in_use(CALMConfig(token_aux_tokens=2)) == []  # a companion alone turns nothing on
    assert extensions_in_use(CALMConfig(token_aux_weight=0.3, token_aux_tokens=2)) == [
        "token_aux_weight=0.3",
        "token_aux_tokens=2",
    ]
    assert extensions_in_use(AutoencoderConfig(context_weight=2.0, context_tau=1.0)) == [
        "context_weight=2.0",
        "context_tau=1.0",
    ]


def test_the_paper_model_refuses_a_config_with_our_options():
    with pytest.raises(ConfigError, match=r"token_anchor=True.*build_calm"):
        CALM(factories.tiny_calm_config(token_anchor=True, token_aux_weight=1.0), factories.tiny_autoencoder(seed=None))
    assert type(build_calm(factories.tiny_calm_config(), factories.tiny_autoencoder(seed=None))) is CALM
    shaped = factories.tiny_calm_config(energy_diversity_weight=0.6)
    assert type(build_calm(shaped, factories.tiny_autoencoder(seed=None))) is ExtendedCALM


@pytest.mark.parametrize("option", [{"energy_diversity_weight": 1.0}, {"token_aux_tokens": 2}])
def test_a_config_without_options_on_builds_the_paper_model(option):
    assert type(factories.tiny_calm(**option)) is CALM


def test_an_option_of_the_loss_only_keeps_weights_and_samples():
    """λ < 1 changes the training loss, not the model: same initial weights and samples for one seed, and its
    logged energy_loss is the paper's score of the same samples."""
    paper = factories.tiny_calm(seed=3)
    shaped = factories.tiny_calm(seed=3, energy_diversity_weight=0.6, energy_mean_weight=0.5)
    assert isinstance(shaped.head, ShapedEnergyHead) and type(paper.head) is EnergyHead
    for (name, a), (other, b) in zip(paper.state_dict().items(), shaped.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b), name
    h = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(paper.draw_chunks(h, 3, gen_a), shaped.draw_chunks(h, 3, gen_b), rtol=0, atol=0)
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(4)
    loss_paper, m_paper = paper(tokens)
    torch.manual_seed(4)
    loss_shaped, m_shaped = shaped(tokens)
    assert m_shaped["energy_loss"] == m_paper["energy_loss"] == loss_paper.detach()
    assert loss_shaped != loss_paper and "mean_loss" in m_shaped


def test_the_shaped_loss_at_its_defaults_is_the_paper_loss_bit_for_bit():
    paper = EnergyHead(factories.tiny_calm_config())
    shaped = ShapedEnergyHead(factories.tiny_calm_config())
    gen = torch.Generator().manual_seed(0)
    samples, targets, mu = torch.randn(4, 6, 8, generator=gen), torch.randn(16, 6, 8, generator=gen), torch.zeros(6, 8)
    (a, ma), (b, mb) = paper.energy_loss(samples, targets, mu), shaped.energy_loss(samples, targets, mu)
    assert torch.equal(a, b) and ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_the_paper_models_code_names_none_of_our_options():
    """calm/models holds the paper's method; our options live in calm/extensions. Only the FLOPs accounting
    (which counts every part a model runs) and nothing else in calm/models may name them."""
    names = {n for fields in EXTENSION_FIELDS.values() for n in fields}
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    offenders = [
        f"{path.name}:{i}"
        for path in sorted(MODELS.glob("*.py"))
        if path.name != "flops.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
