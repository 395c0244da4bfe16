"""The training stages (calm/train/stages.py) build the configs they run from the caller's and never change
the caller's: the vocabulary comes from the data's tokenizer, CALM's K and latent size from the autoencoder."""

from __future__ import annotations

import copy
from pathlib import Path

import factories
import pytest

from calm.train.stages import AutoencoderStage, CALMStage, GPTStage


@pytest.mark.parametrize("kind", ["autoencoder", "calm", "gpt"])
def test_building_a_stage_leaves_the_callers_configs_unchanged(
    kind: str, data_dir: Path, tiny_lm_checkpoints: dict[str, Path]
) -> None:
    train = factories.train_config()
    if kind == "autoencoder":
        model = factories.autoencoder_config(vocab_size=99)
    elif kind == "calm":  # the autoencoder has K = 4 and 8 latent dimensions
        model = factories.calm_config(vocab_size=99, chunk_size=8, latent_size=16, num_target_samples=100)
    else:
        model = factories.gpt_config(vocab_size=99)
    model_before, train_before = copy.deepcopy(model), copy.deepcopy(train)
    if kind == "autoencoder":
        stage = AutoencoderStage(data_dir, model, train)
    elif kind == "calm":
        stage = CALMStage(data_dir, model, train, tiny_lm_checkpoints["ae"])
    else:
        stage = GPTStage(data_dir, model, train)
    assert model == model_before and train == train_before
    assert stage.config is not model and stage.config.vocab_size == stage.tokenizer.vocab_size != 99
    assert stage.model.config == stage.config and stage.train_config == train
    if kind == "calm":
        assert (stage.config.chunk_size, stage.config.latent_size) == (4, 8)
    assert stage.checkpoint_config()["model"]["vocab_size"] == stage.tokenizer.vocab_size
