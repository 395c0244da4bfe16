"""The three training stages that ``calm.train.loop.run_training`` drives.

- ``AutoencoderStage``: chunks packed per document (EOS, PAD to a multiple of K; the authors' code),
  loss CE·K + β·clipped KL (paper Eqs. 1-4).
- ``CALMStage``: blocks of ``block_size`` tokens (L = block_size/K chunks), energy loss against the
  frozen autoencoder's posterior (paper Eqs. 9-10; the step layout of the authors' code).
- ``GPTStage``: blocks of ``block_size`` tokens, next-token cross-entropy (paper §7.1).

A stage owns its data view, model and loss; the loop (``calm.train.loop``) owns everything else.
A stage never changes the configs it is given: it builds the model config it runs (``stage.config``)
from the caller's with ``dataclasses.replace``, taking the vocabulary size from the data's tokenizer
and, for CALM, K and the latent size from the frozen autoencoder (``calm.config.DERIVED_FIELDS``).
Validation BrierLM is logged by CALM and GPT alike so that their curves compare (paper §5); CALM also logs
the head diagnostics of ``calm.eval.diagnostics`` (conditioning gap, reference distances, accuracies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calm.checkpoint import load_model
from calm.config import AutoencoderConfig, CALMConfig, ConfigError, GPTConfig, TrainConfig
from calm.data.shards import PREPARE_AGAIN, TokenShard, ae_chunks, lm_blocks
from calm.data.tokenizer import Tokenizer
from calm.eval.autoencoder import evaluate_autoencoder
from calm.eval.brier import calm_block_brier, gpt_block_brier
from calm.eval.brierlm import BrierAccumulator
from calm.eval.diagnostics import head_diagnostics
from calm.extensions import build_calm
from calm.extensions.context import context_term, neighbour_rows
from calm.io import read_json
from calm.models.autoencoder import Autoencoder
from calm.models.flops import calm_flops, gpt_flops
from calm.models.gpt import GPT


def _open_data(data_dir: str | Path) -> tuple[TokenShard, TokenShard, Tokenizer]:
    data_dir = Path(data_dir)
    if data_dir.is_file():
        prepared = data_dir.with_name(data_dir.name.split(".")[0] + "-data")
        raise FileNotFoundError(
            f"{data_dir} is a text file; --data takes a prepared data directory. Prepare it first with "
            f"`calm prepare --corpus {data_dir} --out {prepared}`, then pass --data {prepared}"
        )
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist; run `calm prepare --out {data_dir}` first")
    train, val = TokenShard(data_dir, "train"), TokenShard(data_dir, "val")
    tok_path = data_dir / "tokenizer.json"
    if not tok_path.exists():
        raise FileNotFoundError(f"{tok_path} is missing; {PREPARE_AGAIN}")
    tokenizer = Tokenizer.from_file(tok_path)
    if tokenizer.sha256 != train.tokenizer_sha256:
        raise ConfigError(
            f"{tok_path} (sha256 {tokenizer.sha256[:12]}…) is not the tokenizer the shards were made with "
            f"({train.tokenizer_sha256[:12]}…); {PREPARE_AGAIN}"
        )
    return train, val, tokenizer


def _eval_rows(n_rows: int, want: int) -> np.ndarray:
    """A fixed, evenly spread subset of rows for periodic evaluation."""
    want = max(1, min(want, n_rows))
    return np.linspace(0, n_rows - 1, want).round().astype(np.int64)


class AutoencoderStage:
    kind = "autoencoder"

    def __init__(self, data_dir: str | Path, config: AutoencoderConfig, train: TrainConfig) -> None:
        train_shard, val_shard, self.tokenizer = _open_data(data_dir)
        config = replace(config, vocab_size=self.tokenizer.vocab_size)  # the data's tokenizer decides it
        config.validate()
        self.config, self.train_config = config, train
        K, tok = config.chunk_size, self.tokenizer
        if config.context_weight > 0 and train.batch_tokens // K < 4:
            raise ConfigError(
                f"context_weight={config.context_weight} needs at least 4 chunks per step (2 neighbour pairs), "
                f"got batch_tokens={train.batch_tokens} with chunk_size={K}; raise --batch-tokens"
            )
        self.chunks = ae_chunks(train_shard, K, tok.eos_id, tok.pad_id)
        val_chunks = ae_chunks(val_shard, K, tok.eos_id, tok.pad_id)
        self.val_chunks = np.asarray(val_chunks[_eval_rows(len(val_chunks), train.eval_tokens // K)])
        torch.manual_seed(train.seed)  # the initial weights follow --seed
        self.model = Autoencoder(config)
        self.tokenizer_json = tok.to_str()
        self.tokens_per_item = K
        self.num_items = len(self.chunks)
        self.flops_per_token = None
        self.data_meta = {"data_dir": str(Path(data_dir).resolve()), "train_tokens": train_shard.num_tokens}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def make_batch(self, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        """Chunks (B, K) at ``indices``. With ``context_weight`` (ours): the first ⌊B/2⌋ indices, then the
        chunk after each of them, so that rows i and ⌊B/2⌋ + i are neighbours (2·⌊B/2⌋ rows; B is even
        for any ``batch_tokens`` that is a multiple of 2K)."""
        if self.config.context_weight > 0:
            rows = neighbour_rows(indices, self.num_items)
        else:
            rows = np.sort(indices)
        return torch.from_numpy(np.asarray(self.chunks[rows], dtype=np.int64)).to(device)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(batch)
        acc = (out.logits.argmax(-1) == batch).float().mean()
        metrics = {"loss": out.loss.detach(), "ce": out.ce.detach(), "kl": out.kl.detach(), "accuracy": acc}
        loss = out.loss
        c = self.config
        if c.context_weight > 0 and model.training:  # ours: InfoNCE between neighbouring chunks (make_batch)
            nce = context_term(out.mu, c.context_tau)
            loss = loss + c.context_weight * nce
            metrics.update(loss=loss.detach(), context_nce=nce.detach())
        return loss, metrics

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        tok = self.tokenizer
        r = evaluate_autoencoder(
            model, self.val_chunks, special_ids=(tok.bos_id, tok.eos_id, tok.pad_id), device=device
        )
        return {k: r[k] for k in ("token_accuracy", "token_accuracy_sampled", "chunk_exact_match", "ce")}

    def checkpoint_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": asdict(self.config),
            "tokenizer_sha256": self.tokenizer.sha256,
            "data": self.data_meta,
        }


class _BlockStage:
    """Shared by CALM and GPT: packed blocks of ``block_size`` tokens (HF group_texts)."""

    kind = "lm"

    def _init_blocks(
        self, data_dir: str | Path, train: TrainConfig, check: Callable[[Tokenizer], None] | None = None
    ) -> None:
        train_shard, val_shard, self.tokenizer = _open_data(data_dir)
        if check is not None:
            check(self.tokenizer)
        self.blocks = lm_blocks(train_shard, train.block_size)
        val_blocks = lm_blocks(val_shard, train.block_size)
        n_val = max(1, train.eval_tokens // train.block_size)
        self.val_blocks = np.asarray(val_blocks[_eval_rows(len(val_blocks), n_val)], dtype=np.int64)
        self.tokenizer_json = self.tokenizer.to_str()
        self.tokens_per_item = train.block_size
        self.num_items = len(self.blocks)
        self.data_meta = {"data_dir": str(Path(data_dir).resolve()), "train_tokens": train_shard.num_tokens}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_batch(self, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.blocks[np.sort(indices)], dtype=np.int64)).to(device)


DIAGNOSTIC_POSITIONS = 1024
"""Validation positions the head diagnostics use at each CALM evaluation (a few seconds on a CPU)."""


class CALMStage(_BlockStage):
    kind = "calm"

    def __init__(
        self, data_dir: str | Path, config: CALMConfig, train: TrainConfig, autoencoder_dir: str | Path
    ) -> None:
        ae, ae_tokenizer, _ = load_model(autoencoder_dir, kind="autoencoder")

        def check(data_tokenizer: Tokenizer) -> None:
            if ae_tokenizer.sha256 != data_tokenizer.sha256:
                sources = " ".join(read_json(Path(data_dir) / "meta.json").get("sources") or ["default"])
                again = f"{str(data_dir).rstrip('/')}-{Path(autoencoder_dir).name}-tokenizer"
                raise ConfigError(
                    f"the autoencoder in {autoencoder_dir} was trained with a different tokenizer than the data "
                    f"in {data_dir}; prepare the data with the autoencoder's tokenizer (`calm prepare --corpus "
                    f"{sources} --tokenizer {autoencoder_dir} --out {again}`, then --data {again}) or train a new "
                    "autoencoder on this data"
                )

        self._init_blocks(data_dir, train, check)
        K = ae.config.chunk_size
        config = replace(config, chunk_size=K, latent_size=ae.config.latent_size, vocab_size=self.tokenizer.vocab_size)
        if train.block_size % K != 0:
            raise ConfigError(f"block_size={train.block_size} is not a multiple of the chunk size K={K}")
        steps = train.block_size // K - 1
        if steps > config.max_seq_len:
            raise ConfigError(
                f"block_size={train.block_size} gives {steps} input steps but max_seq_len={config.max_seq_len}; "
                "raise max_seq_len or lower block_size"
            )
        config.validate()
        self.config, self.train_config = config, train
        torch.manual_seed(train.seed)
        self.model = build_calm(config, ae)
        self.ae_config = ae.config
        self.flops_per_token = calm_flops(config, ae.config, context=train.block_size // K)["train_flops_per_token"]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = model(batch)
        return loss, {"loss": loss.detach(), **metrics}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        model.eval()
        gen = torch.Generator(device="cpu").manual_seed(1234)
        loss_key = f"{self.config.head}_loss"  # the head's own objective: energy_loss, flow_loss or diffusion_loss
        losses, results = [], []
        for row in self.val_blocks:
            block = torch.from_numpy(row)[None].to(device)
            loss, metrics = model(block)
            losses.append(float(metrics.get(loss_key, loss)))  # without auxiliary terms
            results.append(calm_block_brier(model, block, generator=gen))
        # does the head use its context? (calm.eval.diagnostics) on a fixed subset of positions
        diagnostics = head_diagnostics(model, self.val_blocks, max_positions=DIAGNOSTIC_POSITIONS, seed=1234)
        model.train()
        return {loss_key: float(np.mean(losses)), **_merge_brier(results), **diagnostics.as_dict()}

    def checkpoint_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": asdict(self.config),
            "autoencoder": asdict(self.ae_config),
            "tokenizer_sha256": self.tokenizer.sha256,
            "data": self.data_meta,
        }


class GPTStage(_BlockStage):
    kind = "gpt"

    def __init__(self, data_dir: str | Path, config: GPTConfig, train: TrainConfig) -> None:
        self._init_blocks(data_dir, train)
        config = replace(config, vocab_size=self.tokenizer.vocab_size)
        if train.block_size - 1 > config.max_seq_len:
            raise ConfigError(
                f"block_size={train.block_size} exceeds max_seq_len={config.max_seq_len} + 1; "
                "raise max_seq_len or lower block_size"
            )
        config.validate()
        self.config, self.train_config = config, train
        torch.manual_seed(train.seed)
        self.model = GPT(config)
        self.flops_per_token = gpt_flops(config, context=train.block_size)["train_flops_per_token"]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        model.eval()
        gen = torch.Generator(device="cpu").manual_seed(1234)
        ces, results = [], []
        for row in self.val_blocks:
            block = torch.from_numpy(row)[None].to(device)
            logits = model(block[:, :-1])
            ces.append(float(F.cross_entropy(logits.float()[0], block[0, 1:])))
            results.append(gpt_block_brier(model, block, generator=gen, mode="two_sample"))
        model.train()
        ce = float(np.mean(ces))
        return {"ce": ce, "perplexity": float(np.exp(ce)), **_merge_brier(results)}

    def checkpoint_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": asdict(self.config),
            "tokenizer_sha256": self.tokenizer.sha256,
            "data": self.data_meta,
        }


def _merge_brier(per_block: list[torch.Tensor]) -> dict[str, float]:
    acc = BrierAccumulator()
    for est in per_block:
        acc.add(est)
    s = acc.summary()
    return {"brierlm": s["brierlm"], **{f"brier{n}": s[f"brier{n}"] for n in range(1, 5)}}
