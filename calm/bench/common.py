"""Shared parts of the speed benchmarks: the CALM/GPT model pair with one backbone, logging, timing.

``calm.bench.generate`` (decoding speed) and ``calm.bench.train`` (training throughput, MFU) both
compare a CALM with the token-level Transformer of the same backbone (paper Table 1); this
module builds that pair and holds the small helpers both use.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from calm.checkpoint import use_fast_argmax
from calm.config import ConfigError, load_preset
from calm.extensions import build_calm
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM
from calm.models.gpt import GPT

SIZES = ("tiny", "S", "M", "L")
"""Sizes with both a ``calm`` and a ``gpt`` preset (the same backbone in each)."""
LLAMA3_VOCAB = 128_257
"""The Llama-3 vocabulary plus PAD, as in the paper; the tiny models use a 4,096-entry BPE."""
TINY_VOCAB = 4096


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def device_description(device: torch.device) -> str:
    """'cpu: <model name>' or 'cuda: <GPU name>', for the JSON record."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name}"


def run_record(device: str | torch.device, load_average_start: list[float]) -> dict[str, Any]:
    """What every benchmark JSON ends with: device, torch version, threads, load average before/after."""
    return {
        "device": device_description(torch.device(device)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_start": load_average_start,
        "load_average_end": list(os.getloadavg()),
    }


def run_header(result: dict[str, Any]) -> str:
    """The first line a benchmark prints: its ``run_record`` fields."""
    load = result["load_average_start"][0]
    return f"{result['device']}, torch {result['torch']}, {result['threads']} threads, load average {load:.1f}"


# --------------------------------------------------------------------------------------------
# models


def build_pair(
    size: str,
    context: int | None = None,
    min_context: int = 0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[CALM, GPT]:
    """A CALM and a GPT with the same backbone, vocabulary and context, random weights, eval mode.

    The vocabulary is 128,257 (Llama-3) with the ``paper`` autoencoder, or 4,096 with the ``tiny``
    one for ``size="tiny"``. ``context`` (steps for CALM, tokens for the GPT) defaults to the
    presets'. The energy head's zero-initialised output layer is drawn at random, N(0, 1/d), so
    that head samples depend on the noise as a trained head's do.
    """
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    vocab = TINY_VOCAB if size == "tiny" else LLAMA3_VOCAB
    overrides: dict[str, Any] = {"model.vocab_size": vocab}
    ae_config = load_preset("autoencoder", "tiny" if size == "tiny" else "paper", overrides).model
    calm_config = load_preset("calm", size, overrides).model
    gpt_config = load_preset("gpt", size, overrides).model
    context = max(context or calm_config.max_seq_len, min_context)
    calm_config = replace(
        calm_config, max_seq_len=context, chunk_size=ae_config.chunk_size, latent_size=ae_config.latent_size
    )
    gpt_config = replace(gpt_config, max_seq_len=context)
    torch.manual_seed(seed)
    calm = build_calm(calm_config, Autoencoder(ae_config))
    nn.init.normal_(calm.head.final_out.weight, std=calm_config.hidden_size**-0.5)
    gpt = GPT(gpt_config)
    return use_fast_argmax(calm.to(device).eval()), gpt.to(device).eval()
