"""LoRA adapters on a CALM or GPT backbone, through peft (ours; used by ``calm finetune``).

Low-rank adapters (Hu et al., 2021) on every attention and MLP projection of the backbone
(``LORA_TARGETS``); the base weights are frozen. peft's ``LoraModel`` does the work (an optional
dependency: ``pip install 'calm-lm[lora]'``); :func:`add_lora` chooses what else trains, and
``merge_and_unload()`` on the result gives back the plain model with merged weights.
``calm.checkpoint.load_model`` merges the adapters of a LoRA checkpoint on load.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from calm.config import ConfigError

LORA_TARGETS = r".*backbone\.layers\.\d+\.(attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
"""The linear layers LoRA adapts: every attention and MLP projection of the backbone."""


@dataclass(frozen=True)
class LoraOptions:
    """LoRA settings: rank, scale ``alpha``, and which parts outside the backbone stay trainable."""

    rank: int = 8
    alpha: float = 16.0
    train_head: bool = True
    """CALM: the generative head; GPT: the LM head."""
    train_input: bool = True
    """CALM: the input compression (embedding and its MLP); GPT: the token embedding."""


def add_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """``model`` with LoRA adapters on its backbone projections (peft's ``LoraModel``, which changes ``model``
    in place and wraps it). Trainable afterwards: the adapters, and the head / input side as ``options``
    say; a CALM's autoencoder stays frozen. Raises ConfigError without peft, or for a rank below 1."""
    if options.rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {options.rank}")
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError as e:
        raise ConfigError(f"LoRA needs the peft package ({e}); pip install 'calm-lm[lora]'") from e
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
    wrapped = LoraModel(model, config, "default")
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        part = name.split(".", 1)[0]
        head = part in ("head", "lm_head")
        inputs = part in ("embed_tokens", "embed_proj", "latent_proj")
        param.requires_grad = (head and options.train_head) or (inputs and options.train_input)  # not the AE
    return wrapped
