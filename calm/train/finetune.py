"""Fine-tuning a pretrained CALM or GPT on prompt/answer examples (``calm finetune``; ours, not in the paper).

The loss sees only the answer (``calm.data.instruct``: for CALM, its chunks, the prompt left-padded to
a chunk boundary exactly as generation pads it; for the GPT, its tokens). Everything else is the
pre-training loop (``calm.train.loop.run_training``): the same progress, ``metrics.jsonl``, precision,
checkpoints, exact resume, torchrun and bad-input handling. :class:`FinetuneStage` is the stage it drives.

- **Items**: each example padded (PAD, no loss) to the longest one, so a step is ``batch_size``
  examples; an example longer than the model's context is refused, or its answer truncated
  (``too_long="truncate"``); a prompt alone longer than the context is always refused.
- **Evaluation** on a held-out split: the loss on the answer chunks/tokens (``answer_loss``), and, for
  ``eval_generate`` examples, exact match of the generated answer (greedy for the GPT; CALM at its
  greedy temperature, ``calm.generate.lm``), stripped of surrounding space.
- **LoRA** (``lora_rank > 0``) through peft on the backbone's attention and MLP projections; the base
  weights are frozen, the head and the input side (CALM: input compression; GPT: embedding and LM head)
  train or stay frozen by flag. Checkpoints hold the adapters; ``calm.checkpoint.load_model`` merges
  them on load, and the run ends by writing ``OUT/merged``, an ordinary checkpoint of merged weights.

The checkpoint records the templates (``config["finetune"]``), so that ``calm generate`` and ``calm
serve`` wrap a raw prompt the way the examples were wrapped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calm.checkpoint import load_model, save_checkpoint
from calm.config import ConfigError, TrainConfig
from calm.data.instruct import (
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_PROMPT_TEMPLATE,
    Encoded,
    Example,
    ExampleError,
    Fields,
    encode_example,
    read_examples,
    split_examples,
)
from calm.generate.lm import as_language_model
from calm.models.flops import calm_flops, gpt_flops
from calm.models.lora import LoraOptions, add_lora
from calm.train.distributed import is_main
from calm.train.loop import run_training


@dataclass(frozen=True)
class FinetuneData:
    """Where the examples come from and how they are read (the ``calm finetune`` data options)."""

    path: str
    fields: Fields = Fields()
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    too_long: str = "error"
    """``error``: refuse examples longer than the context; ``truncate``: cut their answers."""
    val_fraction: float = 0.1
    eval_generate: int = 32
    """Held-out examples whose generated answers are compared with the reference at each evaluation."""


class FinetuneStage:
    """A pretrained CALM or GPT and its prompt/answer examples, for ``calm.train.loop.run_training``."""

    def __init__(
        self, checkpoint: str | Path, data: FinetuneData, train: TrainConfig, lora: LoraOptions | None = None
    ) -> None:
        model, self.tokenizer, base_config = load_model(checkpoint)
        if base_config["kind"] == "autoencoder":
            raise ConfigError(f"{checkpoint} is an autoencoder; fine-tune a CALM or GPT checkpoint")
        self.kind = base_config["kind"]
        self.base_config = base_config
        self.model_core = model.float().train()
        self.config = model.config
        self.K = model.chunk_size if self.kind == "calm" else 1
        examples = read_examples(data.path, data.fields, data.prompt_template, data.chat_template)
        train_ex, val_ex = split_examples(examples, data.val_fraction, train.seed)
        self.train_items, counts = self._encode(train_ex, data.too_long)
        self.val_items, _ = self._encode(val_ex, data.too_long)
        self.val_examples = val_ex[: data.eval_generate]
        self.counts = {**counts, "train_examples": len(train_ex), "val_examples": len(val_ex)}
        self.tokens_per_item = self.train_items[0].shape[1]
        self.num_items = len(self.train_items[0])
        self.train_config = train
        self.data = data
        self.lora = lora
        self.model = add_lora(model, lora) if lora is not None else model
        self.tokenizer_json = self.tokenizer.to_str()
        context = self.tokens_per_item // self.K
        if self.kind == "calm":
            ae = model.autoencoder.config
            self.flops_per_token = calm_flops(self.config, ae, context=context)["train_flops_per_token"]
        else:
            self.flops_per_token = gpt_flops(self.config, context=context)["train_flops_per_token"]
        self.checkpoint = str(checkpoint)

    # data ------------------------------------------------------------------------------------

    def _max_tokens(self) -> int:
        """Tokens the context holds: CALM reads L - 1 of an example's L chunks; the GPT T - 1 of T tokens."""
        return (self.config.max_seq_len + 1) * self.K

    def _encode(self, examples: list[Example], too_long: str) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, int]]:
        limit, K = self._max_tokens(), self.K
        encoded: list[Encoded] = []
        truncated = 0
        for i, example in enumerate(examples):
            e = encode_example(self.tokenizer, example, K)
            if e.prompt_tokens + K > limit:
                raise ExampleError(
                    f"example {i + 1}: its prompt alone is {e.prompt_tokens} tokens, and the model's context holds "
                    f"{limit} (prompt and at least one answer chunk); shorten the prompt"
                )
            if len(e.ids) > limit:
                if too_long != "truncate":
                    raise ExampleError(
                        f"example {i + 1} is {len(e.ids)} tokens, longer than the context of {limit}; shorten it, "
                        "or pass --too-long truncate to cut long answers"
                    )
                e = Encoded(e.ids[:limit], e.target[:limit], e.prompt_tokens, e.padding)
                truncated += 1
            encoded.append(e)
        length = max(len(e.ids) for e in encoded) if encoded else K
        ids = np.full((len(encoded), length), self.tokenizer.pad_id, dtype=np.int64)
        target = np.zeros((len(encoded), length), dtype=np.int8)
        for row, e in enumerate(encoded):
            ids[row, : len(e.ids)] = e.ids
            target[row, : len(e.target)] = e.target
        padding = sum(e.padding for e in encoded)
        return (ids, target), {"truncated": truncated, "alignment_padding_tokens": padding}

    # the loop's protocol -----------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_batch(self, indices: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.sort(indices)
        ids, target = self.train_items
        return torch.from_numpy(ids[rows]).to(device), torch.from_numpy(target[rows]).to(device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        loss = answer_loss(model, batch, self.kind, self.K)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        model.eval()
        ids, target = self.val_items
        losses = [
            float(answer_loss(model, (torch.from_numpy(ids[i : i + 1]).to(device),
                                      torch.from_numpy(target[i : i + 1]).to(device)), self.kind, self.K))
            for i in range(len(ids))
        ]  # fmt: skip
        result = {"answer_loss": float(np.mean(losses)) if losses else float("nan")}
        if self.val_examples:
            result["exact_match"] = exact_match(self.model_core, self.tokenizer, self.val_examples)
        model.train()
        return result

    def checkpoint_config(self) -> dict[str, Any]:
        record = {
            k: v for k, v in self.base_config.items() if k in ("kind", "model", "autoencoder", "tokenizer_sha256")
        }
        record["finetune"] = {
            "base_checkpoint": self.checkpoint,
            "data": self.data.path,
            "fields": asdict(self.data.fields),
            "prompt_template": self.data.prompt_template,
            "chat_template": self.data.chat_template,
            "too_long": self.data.too_long,
            "counts": self.counts,
            "lora": None if self.lora is None else asdict(self.lora),
        }
        record["data"] = {"finetune_examples": self.counts["train_examples"]}
        return record

    def write_merged(self, out: Path) -> Path | None:
        """With LoRA: the merged weights as an ordinary checkpoint ``out`` (no ``lora`` in its config)."""
        if self.lora is None:
            return None
        merged = self.model.merge_and_unload()
        config = self.checkpoint_config()
        config["finetune"] = {**config["finetune"], "lora": None, "merged_from_lora": asdict(self.lora)}
        return save_checkpoint(out, model=merged, config=config, tokenizer_json=self.tokenizer_json)


def answer_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], kind: str, K: int) -> torch.Tensor:
    """The loss on the answer alone: CALM's own objective over answer chunks, the GPT's cross-entropy over
    answer tokens (``calm.data.instruct``)."""
    ids, target = batch
    if kind == "calm":
        B, T = ids.shape
        chunk_target = target.view(B, T // K, K)[:, :, 0].bool()
        loss, _ = model(ids, target_chunks=chunk_target)
        return loss
    logits = model(ids[:, :-1]).float()
    labels = ids[:, 1:].masked_fill(target[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def exact_match(model: nn.Module, tokenizer: Any, examples: list[Example], num_samples: int = 64) -> float:
    """Share of ``examples`` whose generated answer equals the reference (both stripped): greedy for the GPT,
    CALM at its greedy temperature with ``num_samples`` candidates (Alg. 2)."""
    lm = as_language_model(model, tokenizer)
    hits = 0
    for example in examples:
        budget = len(tokenizer.encode(example.completion)) + lm.tokens_per_step + 1
        (done,) = lm.complete(
            [example.prompt], budget, temperature=lm.greedy_temperature, num_samples=num_samples, seed=0
        )
        hits += done.text.strip() == example.completion.strip()
    return hits / len(examples)


FINETUNE_DEFAULTS = {"lr": 1e-4, "warmup_steps": 10, "lr_schedule": "cosine", "max_steps": 200, "eval_every": 50,
                     "save_every": 100, "log_every": 10, "weight_decay": 0.0}  # fmt: skip
"""Training settings of ``calm finetune`` where the user gives none (ours: a short run at a small rate)."""

LORA_LR = 1e-3
"""The learning rate of ``calm finetune --lora-rank`` when none is given: adapters start at zero and need a
larger rate than full fine-tuning (on the demo GPT, 1e-4 left the parity task at 0% after 200 steps)."""


def finetune_train_config(overrides: dict[str, Any] | None = None) -> TrainConfig:
    """``TrainConfig`` with :data:`FINETUNE_DEFAULTS` and ``overrides`` (``train.KEY`` or ``KEY`` -> value)."""
    values = {**FINETUNE_DEFAULTS, **{k.removeprefix("train."): v for k, v in (overrides or {}).items()}}
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"unknown training options {unknown}; see calm.config.TrainConfig for the names")
    return TrainConfig(**values)


def run_finetune(
    checkpoint: str | Path,
    data: FinetuneData,
    out: str | Path,
    *,
    train: TrainConfig,
    batch_size: int = 8,
    lora: LoraOptions | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    allow_changes: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` on ``data`` into the run directory ``out``; return the final metrics.

    Everything is checked (checkpoint, examples, templates, lengths, options) before ``out`` is created.
    ``batch_size`` examples per optimizer step. With ``lora``, ``out/merged`` receives the merged weights.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    stage = FinetuneStage(checkpoint, data, train, lora)
    cfg = replace(train, batch_tokens=batch_size * stage.tokens_per_item, block_size=stage.tokens_per_item)
    cfg.validate()
    counts = stage.counts
    if is_main():
        print(
            f"finetune: {counts['train_examples']:,} training and {counts['val_examples']:,} held-out examples of "
            f"{stage.tokens_per_item} tokens (padded); {counts['truncated']} answers truncated; "
            f"{counts['alignment_padding_tokens']:,} padding tokens align prompts and answers to chunks"
        )
    result = run_training(
        stage, cfg, out, resume=resume, overwrite=overwrite, progress=progress, allow_changes=allow_changes
    )
    if is_main() and lora is not None:
        merged = stage.write_merged(Path(out) / "merged")
        print(f"LoRA weights merged into an ordinary checkpoint: {merged}")
    return result
