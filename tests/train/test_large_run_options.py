"""Options for large runs: activation checkpointing, the fused AdamW and gradient accumulation change
memory or speed, not the run (losses and weights equal to 1e-6 on tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import factories
import pytest
import torch

from calm import checkpoint as ckpt
from calm.config import ConfigError
from calm.train.loop import build_optimizer, run_training
from calm.train.stages import AutoencoderStage, CALMStage, GPTStage


def _train(kind: str, data_dir: Path, out: Path, ae_dir: Path | None = None, **train) -> list[float]:
    cfg = factories.train_config(
        **{"batch_tokens": 128, "max_steps": 3, "eval_every": 100, "save_every": 100, "block_size": 16, **train}
    )
    torch.manual_seed(0)
    if kind == "gpt":
        stage = GPTStage(data_dir, factories.gpt_config(), cfg)
    else:
        stage = CALMStage(data_dir, factories.calm_config(), cfg, ae_dir)
    run_training(stage, cfg, out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.fixture(scope="module")
def ae_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ae") / "run"
    cfg = factories.train_config(batch_tokens=256, max_steps=2, eval_every=100, save_every=100)
    torch.manual_seed(0)
    stage = AutoencoderStage(tiny_data_dir, factories.autoencoder_config(), cfg)
    run_training(stage, cfg, out, progress=False)
    return out


def _same_run(a: Path, b: Path, losses_a: list[float], losses_b: list[float]) -> None:
    assert losses_a == pytest.approx(losses_b, abs=1e-6, rel=1e-6)
    wa, wb = ckpt.load_weights(a), ckpt.load_weights(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


@pytest.mark.parametrize("kind", ["gpt", "calm"])
def test_activation_checkpointing_gives_the_same_run(kind, tiny_data_dir, ae_dir, tmp_path) -> None:
    plain = _train(kind, tiny_data_dir, tmp_path / "plain", ae_dir, log_every=1)
    recomputed = _train(kind, tiny_data_dir, tmp_path / "ckpt", ae_dir, log_every=1, activation_checkpointing=True)
    _same_run(tmp_path / "plain", tmp_path / "ckpt", plain, recomputed)


def test_activation_checkpointing_recomputes_each_block(tiny_data_dir, ae_dir, tmp_path, monkeypatch) -> None:
    """The option is not a no-op: every block runs twice per training micro-batch (forward, then again in backward)."""
    from calm.models import layers

    calls = {"n": 0}
    real = layers.Block.forward

    def counted(self, *args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # training passes only, not the evaluation's
        return real(self, *args, **kwargs)

    monkeypatch.setattr(layers.Block, "forward", counted)
    _train("gpt", tiny_data_dir, tmp_path / "plain", max_steps=1, eval_every=100)
    plain, calls["n"] = calls["n"], 0
    _train("gpt", tiny_data_dir, tmp_path / "ckpt", max_steps=1, eval_every=100, activation_checkpointing=True)
    assert plain > 0 and calls["n"] == 2 * plain


def test_gradient_accumulation_equals_one_large_batch(tiny_data_dir, ae_dir, tmp_path) -> None:
    """Four micro-batches of 32 tokens per step against one batch of 128: the same losses and weights."""
    whole = _train("gpt", tiny_data_dir, tmp_path / "whole", log_every=1)
    split = _train("gpt", tiny_data_dir, tmp_path / "split", log_every=1, micro_batch_tokens=32)
    _same_run(tmp_path / "whole", tmp_path / "split", whole, split)


def test_the_fused_adamw_is_chosen_by_device_and_gives_the_same_steps(tiny_data_dir, tmp_path) -> None:
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    cfg = factories.train_config()
    assert not build_optimizer(params, cfg, "cpu").defaults["fused"]  # auto: off on CPU
    assert build_optimizer(params, factories.train_config(fused_optimizer="on"), "cpu").defaults["fused"]
    with pytest.raises(ConfigError, match="fused_optimizer must be auto, on or off"):
        factories.train_config(fused_optimizer="yes").validate()
    plain = _train("gpt", tiny_data_dir, tmp_path / "plain", log_every=1)
    fused = _train("gpt", tiny_data_dir, tmp_path / "fused", log_every=1, fused_optimizer="on")
    _same_run(tmp_path / "plain", tmp_path / "fused", plain, fused)
