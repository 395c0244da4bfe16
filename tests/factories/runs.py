"""Tiny training runs: the train config, and the same tiny sizes as ``--set`` overrides for the CLI and sweeps."""

from __future__ import annotations

from typing import Any

from calm.config import TrainConfig

from .models import TINY_AE, TINY_CALM, TINY_GPT, TINY_LM

TINY_TRAIN: dict[str, Any] = dict(
    lr=3e-3,
    batch_tokens=64,
    max_steps=2,
    eval_every=2,
    save_every=2,
    log_every=1,
    eval_tokens=64,
    precision="fp32",
    block_size=32,
)
"""Two fp32 steps of 64 tokens in blocks of 32, evaluated and saved at the end, every step logged."""


def train_config(**overrides: Any) -> TrainConfig:
    """``TINY_TRAIN`` plus ``overrides`` (any TrainConfig field)."""
    return TrainConfig(**{**TINY_TRAIN, **overrides})


def dotted(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``{"hidden_size": 32}`` -> ``{"model.hidden_size": 32}``: config values as ``--set`` / sweep keys."""
    return {f"{section}.{key}": value for key, value in values.items()}


def set_args(overrides: dict[str, Any]) -> list[str]:
    """``{"model.hidden_size": 32}`` -> ``["--set", "model.hidden_size=32"]`` for ``calm.cli.main``."""
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


# sweep groups' ``set`` dicts: the tiny sizes with fp32 steps of 64 (LM) or 256 (AE) tokens
SMALL_LM: dict[str, Any] = {
    **dotted("model", TINY_LM),
    "model.max_seq_len": 16,
    "train.batch_tokens": 64,
    "train.block_size": 32,
    "train.eval_tokens": 64,
    "train.precision": "fp32",
    "train.warmup_steps": 1,
    "train.log_every": 1,
}
SMALL_GPT: dict[str, Any] = {**SMALL_LM, "model.max_seq_len": TINY_GPT["max_seq_len"]}
SMALL_CALM: dict[str, Any] = {**SMALL_LM, **dotted("model", TINY_CALM)}
SMALL_AE: dict[str, Any] = {
    **dotted("model", TINY_AE),
    "train.batch_tokens": 256,
    "train.eval_tokens": 256,
    "train.precision": "fp32",
    "train.warmup_steps": 1,
    "train.log_every": 1,
}
