"""``calm train-ae``, ``calm train-calm``, ``calm train-gpt``: the three training stages (paper §3-4, §7.1);
``calm finetune``: a pretrained CALM or GPT on prompt/answer examples (ours).

Each command loads a preset (``calm/configs/*.yaml``), applies the command-line overrides, builds
the stage (``calm.train.stages``) and runs the one training loop (``calm.train.loop.run_training``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from calm.config import check_overrides, load_preset, parse_override, preset_names
from calm.data.instruct import DEFAULT_CHAT_TEMPLATE, DEFAULT_PROMPT_TEMPLATE, Fields
from calm.io import to_json
from calm.models.lora import LoraOptions
from calm.train import distributed
from calm.train.finetune import FINETUNE_DEFAULTS, LORA_LR, FinetuneData, finetune_train_config, run_finetune
from calm.train.loop import run_training
from calm.train.stages import AutoencoderStage, CALMStage, GPTStage

_FLAG_OVERRIDES = ("max_steps", "max_minutes", "batch_tokens", "lr", "seed", "precision", "eval_every", "save_every")
"""Flags that set ``train.<name>``."""


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in getattr(args, "set", None) or []:
        key, value = parse_override(text)
        out[key] = value
    for name in _FLAG_OVERRIDES:
        value = getattr(args, name, None)
        if value is not None:
            out[f"train.{name}"] = value
    return out


def _train(args: argparse.Namespace, kind: str, make_stage: Callable[[Any], Any]) -> int:
    """Load ``kind``'s preset with the command line's overrides, build the stage from it, and train."""
    distributed.set_strategy(args.strategy)
    overrides = _overrides(args)
    check_overrides(kind, overrides)
    preset = load_preset(kind, args.preset, overrides)
    train = dataclasses.replace(preset.train, skip_nonfinite=True) if args.skip_nonfinite else preset.train
    train.validate()
    result = run_training(
        make_stage(dataclasses.replace(preset, train=train)),
        train,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        allow_changes=args.allow_changes,
    )
    if distributed.is_main():
        print(f"{kind} training done: {to_json(result)}; checkpoints in {args.out}/checkpoints")
    return 0


def cmd_train_ae(args: argparse.Namespace) -> int:
    """Stage 1: the chunk autoencoder."""
    return _train(args, "autoencoder", lambda preset: AutoencoderStage(args.data, preset.model, preset.train))


def cmd_train_calm(args: argparse.Namespace) -> int:
    """Stage 2: CALM on a frozen autoencoder (``--autoencoder``)."""
    return _train(args, "calm", lambda preset: CALMStage(args.data, preset.model, preset.train, args.autoencoder))


def cmd_train_gpt(args: argparse.Namespace) -> int:
    """The token-level baseline."""
    return _train(args, "gpt", lambda preset: GPTStage(args.data, preset.model, preset.train))


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a CALM or GPT checkpoint on prompt/answer examples (``calm.train.finetune``)."""
    distributed.set_strategy(args.strategy)
    overrides = _overrides(args)  # --set and the flags it has of _FLAG_OVERRIDES
    if args.lora_rank and "train.lr" not in overrides and "lr" not in overrides:
        overrides["train.lr"] = LORA_LR
    train = finetune_train_config(overrides)
    data = FinetuneData(
        path=args.data,
        fields=Fields(args.prompt_field, args.completion_field, args.messages_field),
        prompt_template=_template(args.prompt_template, DEFAULT_PROMPT_TEMPLATE),
        chat_template=_template(args.chat_template, DEFAULT_CHAT_TEMPLATE),
        too_long=args.too_long,
        val_fraction=args.val_fraction,
        eval_generate=args.eval_generate,
    )
    lora = None
    if args.lora_rank:
        lora = LoraOptions(args.lora_rank, args.lora_alpha, not args.freeze_head, not args.freeze_input)
    result = run_finetune(
        args.checkpoint, data, args.out, train=train, batch_size=args.batch_size, lora=lora, resume=args.resume,
        overwrite=args.overwrite, progress=not args.no_progress, allow_changes=args.allow_changes,
    )  # fmt: skip
    if distributed.is_main():
        print(f"finetune done: {to_json(result)}; checkpoints in {args.out}/checkpoints")
    return 0


def _template(value: str | None, default: str) -> str:
    """A template given inline, or ``@FILE`` to read it from a file."""
    if value is None:
        return default
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise FileNotFoundError(f"template file {path} does not exist")
        return path.read_text(encoding="utf-8")
    return value


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="pretrained CALM or GPT (checkpoint or run directory)")
    p.add_argument("--data", required=True, help="JSONL of prompt/completion pairs or chat messages")
    p.add_argument("--out", required=True, help="run directory for checkpoints and metrics.jsonl")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default {FINETUNE_DEFAULTS['max_steps']})")
    p.add_argument(
        "--lr", type=float, help=f"peak learning rate (default {FINETUNE_DEFAULTS['lr']}; {LORA_LR} with --lora-rank)"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="training option, e.g. train.warmup_steps=0")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--completion-field", default="completion")
    p.add_argument("--messages-field", default="messages")
    p.add_argument("--prompt-template", help="Jinja template of a prompt (or @FILE), default '{{ prompt }}'")
    p.add_argument("--chat-template", help="Jinja template over `messages` (or @FILE) for chat examples")
    p.add_argument("--too-long", choices=["error", "truncate"], default="error", help="examples over the context")
    p.add_argument("--val-fraction", type=float, default=0.1, help="examples held out for evaluation")
    p.add_argument("--eval-generate", type=int, default=32, help="held-out examples scored by exact match")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning, the default)")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--freeze-head", action="store_true", help="with LoRA: keep the head (LM head) frozen")
    p.add_argument("--freeze-input", action="store_true", help="with LoRA: keep the input side frozen")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    p.add_argument("--allow-changes", action="store_true", help="on --resume, apply changed training options")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="multi-process strategy under torchrun")
    p.add_argument("--no-progress", action="store_true")


def _train_arguments(kind: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        presets, default = preset_names(kind), "tiny"
        p.add_argument("--data", required=True, help="prepared data directory (from `calm prepare`)")
        p.add_argument("--out", required=True, help="run directory for checkpoints and metrics.jsonl")
        p.add_argument("--preset", default=default, choices=presets, help=f"named preset (default {default})")
        p.add_argument("--max-steps", type=int, help="optimizer steps (overrides the preset)")
        p.add_argument("--max-minutes", type=float, help="stop after this many minutes of training")
        p.add_argument("--batch-tokens", type=int, help="global batch per optimizer step, in tokens")
        p.add_argument("--lr", type=float, help="peak learning rate")
        p.add_argument("--seed", type=int)
        p.add_argument(
            "--precision",
            choices=["auto", "fp32", "bf16"],
            help="auto (default): bf16 where the hardware runs it fast",
        )
        p.add_argument("--eval-every", type=int)
        p.add_argument("--save-every", type=int)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. model.hidden_size=512")
        p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
        p.add_argument(
            "--allow-changes",
            action="store_true",
            help="on --resume, apply changed training options (lr, batch, seed, ...) from the checkpoint's step on",
        )
        p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
        p.add_argument("--skip-nonfinite", action="store_true", help="skip steps with NaN/inf instead of stopping")
        p.add_argument(
            "--strategy", choices=["ddp", "fsdp"], default="ddp", help="multi-process strategy under torchrun"
        )
        p.add_argument("--no-progress", action="store_true")
        if kind == "calm":
            p.add_argument("--autoencoder", required=True, help="autoencoder checkpoint or run directory")

    return add


ARGUMENTS = {
    "finetune": _finetune_arguments,
    "train-ae": _train_arguments("autoencoder"),
    "train-calm": _train_arguments("calm"),
    "train-gpt": _train_arguments("gpt"),
}
