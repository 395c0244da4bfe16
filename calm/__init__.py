"""calm: Continuous Autoregressive Language Models (Shao et al., arXiv 2510.27688) in PyTorch.

Stage 1 trains a chunk autoencoder (``calm.models.autoencoder``); stage 2 trains a Transformer
that predicts the next chunk's latent vector with an energy-score head (``calm.models.calm``).
``calm.eval.brierlm`` implements BrierLM, ``calm.generate.sampling`` likelihood-free temperature sampling.

The public API, for a checkpoint or run directory that ``calm train-calm`` / ``calm train-gpt`` wrote::

    from calm import load_model, generate_text

    model, tokenizer, config = load_model("runs/demo/calm")
    generate_text(model, tokenizer, ["The history of the city"], 64, temperature=0.5)

``as_language_model(model, tokenizer)`` gives the interface that generation, serving and
evaluation share (``calm.generate.lm``), and ``evaluate_checkpoint`` scores a checkpoint with
BrierLM (``calm eval``). The names load on first use, so ``import calm.config`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "calm.checkpoint",
    "generate_text": "calm.generate.lm",
    "complete": "calm.generate.lm",
    "Completion": "calm.generate.lm",
    "as_language_model": "calm.generate.lm",
    "load_language_model": "calm.generate.lm",
    "LanguageModel": "calm.generate.lm",
    "LanguageModelError": "calm.generate.lm",
    "evaluate_checkpoint": "calm.eval.brier",
}
"""Public name -> the module that defines it."""

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
