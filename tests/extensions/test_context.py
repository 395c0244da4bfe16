"""The autoencoder's context term (ours, ``autoencoder.context_weight``; docs/guides/extensions.md,
docs/research/small-calm.md).

An InfoNCE loss between each chunk's posterior mean and the next chunk's, against the other chunks of
the batch. Checked here: the loss on known geometries, the batch layout that pairs neighbours, that the
term is added in training only, the refusals, and that training with it draws neighbours together.
"""

from __future__ import annotations

import math

import factories
import numpy as np
import pytest
import torch

from calm.config import AutoencoderConfig, ConfigError, TrainConfig
from calm.extensions.context import context_nce
from calm.train.loop import run_training
from calm.train.stages import AutoencoderStage


def _stage(data_dir, **kw) -> AutoencoderStage:
    """The tiny autoencoder's stage (seeded 0) for 60 steps of 256 tokens; ``kw`` go to AutoencoderConfig."""
    torch.manual_seed(0)
    steps = dict(batch_tokens=256, max_steps=60, eval_every=60, save_every=60, log_every=20, eval_tokens=256)
    return AutoencoderStage(
        data_dir, factories.autoencoder_config(**kw), factories.train_config(warmup_steps=2, **steps)
    )


def test_context_nce_known_answers():
    mu = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    # every chunk alike: the right successor is one of B equally likely ones
    same = torch.zeros(6, 8)
    assert context_nce(same, same, 4.0).item() == pytest.approx(math.log(6))
    # successors equal to their chunks and the chunks far apart: the right one is certain
    assert context_nce(100 * mu, 100 * mu, 1.0).item() < 1e-6
    # a larger τ flattens the logits toward log B
    assert context_nce(mu, mu, 1.0) < context_nce(mu, mu, 100.0) < math.log(6)


def test_make_batch_pairs_each_chunk_with_the_next_and_keeps_the_batch_size(tiny_data_dir):
    stage = _stage(tiny_data_dir, context_weight=1.0)
    indices = np.random.default_rng(0).permutation(stage.num_items)[:64]
    batch = stage.make_batch(indices, torch.device("cpu"))
    first = np.sort(indices[:32])
    assert batch.shape == (64, 4)
    assert torch.equal(batch[:32], torch.as_tensor(np.asarray(stage.chunks[first], dtype=np.int64)))
    assert torch.equal(batch[32:], torch.as_tensor(np.asarray(stage.chunks[first + 1], dtype=np.int64)))
    plain = _stage(tiny_data_dir).make_batch(indices, torch.device("cpu"))
    assert torch.equal(plain, torch.as_tensor(np.asarray(stage.chunks[np.sort(indices)], dtype=np.int64)))


def test_the_term_is_added_in_training_only(tiny_data_dir):
    stage = _stage(tiny_data_dir, context_weight=2.0)
    batch = stage.make_batch(np.arange(16), torch.device("cpu"))
    model = stage.model.train()
    torch.manual_seed(1)
    loss, metrics = stage.loss(model, batch)
    torch.manual_seed(1)
    plain = model(batch).loss
    torch.testing.assert_close(loss, plain + 2.0 * metrics["context_nce"])
    assert metrics["loss"] == loss.detach()
    _, eval_metrics = stage.loss(model.eval(), batch)
    assert "context_nce" not in eval_metrics


def test_a_batch_too_small_for_two_pairs_is_refused(tiny_data_dir):
    config = factories.autoencoder_config(context_weight=1.0)
    train = TrainConfig(batch_tokens=8, max_steps=1, precision="fp32")  # 2 chunks of K = 4 per step
    with pytest.raises(ConfigError, match="needs at least 4 chunks per step"):
        AutoencoderStage(tiny_data_dir, config, train)


@pytest.mark.parametrize("overrides", [{"context_weight": -1.0}, {"context_tau": 0.0}])
def test_bad_values_are_refused(overrides):
    with pytest.raises(ConfigError, match=next(iter(overrides))):
        AutoencoderConfig(**overrides).validate()


def test_training_with_the_term_draws_neighbouring_chunks_together(tiny_data_dir, tmp_path):
    """Neighbours end nearer each other than random pairs, relative to the plain autoencoder."""

    def neighbour_ratio(weight: float) -> float:
        stage = _stage(tiny_data_dir, context_weight=weight)
        run_training(stage, stage.train_config, tmp_path / f"w{weight}", progress=False)
        chunks = torch.as_tensor(np.asarray(stage.chunks[:400], dtype=np.int64))
        with torch.no_grad():
            mu = stage.model.eval().encode(chunks)[0]
        near = (mu[1:] - mu[:-1]).norm(dim=-1).mean()
        far = (mu[torch.randperm(400, generator=torch.Generator().manual_seed(0))] - mu).norm(dim=-1).mean()
        ratio = float(near / far)
        print(f"context_weight {weight}: neighbour / random distance {ratio:.3f}")
        return ratio

    assert neighbour_ratio(4.0) < 0.8 * neighbour_ratio(0.0)  # measured: 0.41 against 1.01
