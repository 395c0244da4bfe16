"""One training loop for every stage: the autoencoder, CALM and the token baseline.

The stage (``calm.train.stages``) decides the model, its trainable parameters, how a batch is built from
item indices, the loss and the periodic evaluation. This loop owns everything else: AdamW with the
paper's recipe (β = (0.9, 0.95), weight decay 0.1 on matrices only, grad clip 1.0; paper §7.1),
warm-up and decay, gradient accumulation derived from a global batch in tokens, bf16
autocast, progress bars, ``metrics.jsonl`` logging, periodic checkpoints, exact resume (model,
optimizer, RNG and data position), SIGTERM and Ctrl-C handling (a checkpoint after the current step,
then exit; a second Ctrl-C exits at once) and non-finite guards.

Under ``torchrun`` every rank runs this loop on its slice of each global batch (``calm.train.distributed``
wraps the model in DDP or FSDP2); rank 0 logs and writes. Each micro-batch's noise is seeded by its
position in the global batch (``micro_batch_seed``), so results do not depend on the world size
or on interruptions. See docs/guides/distributed.md.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from calm import checkpoint as ckpt
from calm.config import ConfigError, TrainConfig
from calm.data.shards import BatchSampler
from calm.hardware import autocast, describe, resolve_precision
from calm.io import append_jsonl, atomic_write_text, read_jsonl, to_json, write_json
from calm.models.layers import Backbone
from calm.train import distributed as dist


class Stage(Protocol):
    kind: str
    model: nn.Module
    tokenizer_json: str
    tokens_per_item: int
    num_items: int
    flops_per_token: float | None

    def trainable_parameters(self) -> list[nn.Parameter]: ...
    def make_batch(self, indices: np.ndarray, device: torch.device) -> torch.Tensor: ...
    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...
    def checkpoint_config(self) -> dict[str, Any]: ...


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


def build_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, device: torch.device | str = "cpu"
) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only (biases and norm gains are not decayed).

    ``cfg.fused_optimizer``: ``auto`` uses the fused kernel on CUDA only, ``on`` wherever torch has one
    for ``device``, ``off`` never.
    """
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.fused_optimizer == "on" or (cfg.fused_optimizer == "auto" and torch.device(device).type == "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn per-block activation checkpointing on or off in every backbone of ``model`` (CALM, GPT)."""
    for module in model.modules():
        if isinstance(module, Backbone):
            module.checkpoint_blocks = enabled


def resolve_run_precision(cfg: TrainConfig, device: torch.device, saved: dict[str, Any] | None) -> str:
    """The precision this run computes in: ``cfg.precision`` resolved for ``device`` (``calm.hardware``).

    A resumed run keeps the precision it was started in: ``auto`` takes the checkpoint's, and an
    explicit different one is refused (the continuation would no longer match an unbroken run).
    """
    if saved is None or "precision" not in saved:
        return resolve_precision(cfg.precision, device)
    started = saved["precision"]
    if cfg.precision not in ("auto", started):
        raise ConfigError(
            f"this run was started in {started} and resumes in {started}; drop --precision {cfg.precision} "
            f"(or pass --precision {started}), or start a new run with --overwrite to train in {cfg.precision}"
        )
    return resolve_precision(started, device)


class _StopFlag:
    """Set by SIGTERM or a first Ctrl-C (SIGINT) so the loop writes a checkpoint after the current step and
    exits; a second Ctrl-C interrupts at once (KeyboardInterrupt, nothing saved)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum
        if signum == signal.SIGINT:
            print(
                "\nstopping after this step and saving a checkpoint (Ctrl-C again to quit at once)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check the output directory; return the checkpoint to resume from, if any."""
    existing = ckpt.list_checkpoints(out)
    if resume:
        dist.barrier()  # every rank has listed before rank 0 may write
        return existing[-1] if existing else None
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"output directory {out} already exists and is not empty; pass --resume to continue the run "
                "or --overwrite to start over (this deletes its checkpoints and metrics)"
            )
        dist.barrier()  # every rank has checked before rank 0 deletes
        if dist.is_main():
            shutil.rmtree(out)
    dist.barrier()
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint so the log matches an unbroken run.

    A last line cut short by a crash (SIGKILL during the append) is dropped too, with a warning
    (``calm.io.read_jsonl``); a damaged line elsewhere stops the resume with an error naming it.
    """
    if not path.exists():
        return
    keep = [record for record in read_jsonl(path) if record.get("step", 0) <= step]
    atomic_write_text(path, "".join(to_json(record) + "\n" for record in keep))


_TRAIN_RNG, _EVAL_RNG = 0, 1


def micro_batch_seed(seed: int, step: int, slot: int, purpose: int = _TRAIN_RNG) -> int:
    """The seed of the global RNG for one micro-batch: a hash of (seed, step, slot).

    ``slot = micro * world_size + rank`` is the micro-batch's position in the global batch, the same
    position ``BatchSampler`` gives its items. So the noise a micro-batch draws (DropToken,
    DropLatent and the posterior sample in the autoencoder; target samples and head noise in CALM)
    depends on which items it holds, not on which rank holds them or on the RNG history: a run on
    2 ranks draws exactly what a run on 1 rank with 2 accumulation steps draws, and a resumed run
    draws what the unbroken run drew.
    """
    words = np.random.SeedSequence([seed & 0xFFFFFFFF, purpose, step, slot]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


TRAJECTORY_FIELDS = (
    "lr",
    "lr_schedule",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "beta1",
    "beta2",
    "eps",
    "grad_clip",
    "batch_tokens",
    "block_size",
    "seed",
)
"""Training options whose change on resume changes what the run computes from then on (``max_steps``,
evaluation and checkpoint intervals do not): refused unless ``allow_changes``, then recorded."""


def train_changes(saved_train: dict[str, Any], cfg: TrainConfig, step: int) -> list[dict[str, Any]]:
    """The ``TRAJECTORY_FIELDS`` that ``cfg`` changes against the checkpoint's train config, each as
    ``{"step", "field", "from", "to"}`` (in effect from the step after ``step``)."""
    current = asdict(cfg)
    return [
        {"step": step, "field": f, "from": saved_train[f], "to": current[f]}
        for f in TRAJECTORY_FIELDS
        if f in saved_train and saved_train[f] != current[f]
    ]


class ResumeChangesError(ConfigError):
    """A resume whose training options differ from the checkpoint's in ``TRAJECTORY_FIELDS``; ``changes``
    lists them (``train_changes`` entries), ``listed`` says them in words."""

    def __init__(self, message: str, changes: list[dict[str, Any]], listed: str) -> None:
        super().__init__(message)
        self.changes, self.listed = changes, listed


def _refuse_changes(resume_from: Path, changes: list[dict[str, Any]]) -> None:
    listed = ", ".join(f"train.{c['field']} {c['from']!r} -> {c['to']!r}" for c in changes)
    raise ResumeChangesError(
        f"resuming {resume_from} with other training options would change the run from step {changes[0]['step']} "
        f"on ({listed}); resume with the options it was trained with, or pass --allow-changes to apply them "
        "(recorded with their step in run_config.json as train_changes)",
        changes,
        listed,
    )


def _check_resumable(resume_from: Path, saved: dict[str, Any], stage: Stage) -> None:
    """The checkpoint (``saved``: its config.json) must belong to this stage, tokenizer and model configuration."""
    current = stage.checkpoint_config()
    if saved["kind"] != stage.kind:
        raise ckpt.CheckpointError(
            f"{resume_from} is {ckpt.indefinite_article(saved['kind'])} {saved['kind']} checkpoint but this is "
            f"{ckpt.indefinite_article(stage.kind)} {stage.kind} run; "
            f"pick the run directory of {ckpt.indefinite_article(stage.kind)} {stage.kind} run or start a new one"
        )
    if saved.get("tokenizer_sha256") != current.get("tokenizer_sha256"):
        raise ckpt.CheckpointError(
            f"{resume_from} was trained with another tokenizer than the data's; resume with the data it was "
            "trained on, or start a new run with --overwrite"
        )
    for section in ("model", "autoencoder"):
        a, b = saved.get(section), current.get(section)
        if a != b:
            keys = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
            raise ckpt.CheckpointError(
                f"{resume_from}: its {section} config differs from this run's in {keys}; resume with the "
                "same preset and overrides (and the same autoencoder), or start a new run with --overwrite"
            )


def run_training(
    stage: Stage,
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: torch.device | None = None,
    allow_changes: bool = False,
) -> dict[str, Any]:
    """Train ``stage`` under ``cfg`` into the run directory ``out``; return the final metrics.

    Under ``torchrun`` every rank calls this; rank 0 logs and writes. Resuming (``resume=True``)
    restores weights, optimizer moments, data position and RNG from the newest complete checkpoint,
    and the continuation is bit-identical to an unbroken run on CPU. A resume whose ``cfg`` changes a
    ``TRAJECTORY_FIELDS`` option is refused (ConfigError, before any file is touched) unless
    ``allow_changes``; then each change is recorded with its step in ``run_config.json``
    (``train_changes``, kept across later resumes).
    """
    out = Path(out)
    ctx = dist.context()
    device = device or ctx.device
    cfg.validate(ctx.world_size)
    accum = cfg.grad_accum_steps(ctx.world_size)
    sampler = _batch_sampler(stage, cfg, ctx, accum)
    resume_from = prepare_run_dir(out, resume, overwrite)
    saved, meta, state_tensors, weights = _read_resume_point(resume_from, out, stage, device)
    changes = train_changes(saved.get("train", {}), cfg, meta["step"]) if saved is not None else []
    if changes and not allow_changes:
        _refuse_changes(resume_from, changes)
    precision = resolve_run_precision(cfg, device, saved.get("train") if saved is not None else None)
    if dist.is_main():
        print(f"{stage.kind}: {describe(precision, device)} (requested: {cfg.precision})", flush=True)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = stage.model.to(device)
    if resume_from is not None:
        ckpt.load_state_into(model, weights, resume_from)
    del weights
    train_model = dist.wrap_model(model, ctx, stage.trainable_parameters())
    params = stage.trainable_parameters()  # after wrapping: FSDP2 replaces them with sharded ones
    optimizer = build_optimizer(params, cfg, device)
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    run = _Run(stage, cfg, out, ctx, device, precision, accum, sampler, model, train_model, params, optimizer)
    previous = (saved or {}).get("train_changes", [])
    if previous or changes:
        run.config_record["train_changes"] = previous + changes
        for c in changes:
            if dist.is_main():
                print(f"train.{c['field']}: {c['from']!r} -> {c['to']!r} from step {c['step'] + 1} (--allow-changes)")
    if resume_from is not None:
        run.restore(meta, state_tensors)
    del state_tensors
    if cfg.compile:
        run.train_model = torch.compile(train_model)
    if dist.is_main():
        run.start_run_dir(resume, resume_from)
    return run.train(progress)


def _batch_sampler(stage: Stage, cfg: TrainConfig, ctx: dist.DistContext, accum: int) -> BatchSampler:
    """This rank's sampler: each micro-batch holds ``batch_tokens / (accum · world_size)`` tokens of whole items."""
    micro_tokens = cfg.batch_tokens // (accum * ctx.world_size)
    if micro_tokens % stage.tokens_per_item != 0:
        raise ConfigError(
            f"micro-batch of {micro_tokens} tokens is not a multiple of the {stage.tokens_per_item} tokens per "
            f"training item; set batch_tokens/micro_batch_tokens to a multiple of {stage.tokens_per_item}"
        )
    items_per_rank = micro_tokens // stage.tokens_per_item
    return BatchSampler(stage.num_items, items_per_rank, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)


def _read_resume_point(
    resume_from: Path | None, out: Path, stage: Stage, device: torch.device
) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config.json, training-state metadata, training-state tensors, weights) of the checkpoint to resume
    from, all read and checked before any file is touched; (None, {}, {}, {}) for a new run."""
    if resume_from is None:
        return None, {}, {}, {}
    try:
        saved = ckpt.read_config(resume_from)  # every file present, with its recorded size
        meta, state_tensors = ckpt.load_training_state(resume_from)
        weights = ckpt.load_weights(resume_from, device)
    except ckpt.CheckpointError as e:
        older = ckpt.list_checkpoints(out)[:-1]
        hint = ""
        if older:
            hint = f"; to resume from the previous one ({older[-1].name}), delete {resume_from}"
        raise ckpt.CheckpointError(f"cannot resume: {e}{hint}") from e
    _check_resumable(resume_from, saved, stage)
    return saved, meta, state_tensors, weights


class _Run:
    """One training run in progress: the model and its wrapper, the optimizer, the data position and the
    counters. Every rank holds one; rank 0 logs and writes."""

    def __init__(
        self,
        stage: Stage,
        cfg: TrainConfig,
        out: Path,
        ctx: dist.DistContext,
        device: torch.device,
        precision: str,
        accum: int,
        sampler: BatchSampler,
        model: nn.Module,
        train_model: nn.Module,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self.stage, self.cfg, self.out, self.ctx, self.device = stage, cfg, out, ctx, device
        self.precision, self.accum, self.sampler = precision, accum, sampler
        self.model = model  # the module itself: evaluated and saved
        self.train_model = train_model  # what the steps run: DDP / FSDP2 / torch.compile around ``model``
        self.params, self.optimizer = params, optimizer
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.metrics_path = out / "metrics.jsonl"
        self.config_record = {
            **stage.checkpoint_config(),
            "train": {**asdict(cfg), "precision": precision, "precision_requested": cfg.precision},
        }

    def restore(self, meta: dict[str, Any], state_tensors: dict[str, torch.Tensor]) -> None:
        """Optimizer moments, data position, RNG state and counters from a checkpoint's training state."""
        opt_state = ckpt.optimizer_state_from_tensors(state_tensors, meta["optimizer"])
        dist.load_optimizer_state(self.optimizer, self.train_model, opt_state)
        self.sampler.load_state_dict(meta["sampler"])
        ckpt.restore_rng_state(state_tensors, meta["rng"])
        self.step, self.tokens_seen, self.elapsed_before = meta["step"], meta["tokens_seen"], meta.get("elapsed_s", 0.0)

    def start_run_dir(self, resume: bool, resume_from: Path | None) -> None:
        """Rank 0: the run directory, cleaned and its log cut back to the checkpoint on resume, and run_config.json."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            ckpt.clean_incomplete(self.out)  # leftovers of a write that a crash interrupted
            _truncate_metrics(self.metrics_path, self.step)
            if resume_from is not None:
                print(f"resuming {self.stage.kind} from {resume_from} at step {self.step}")
        write_json(self.out / "run_config.json", self.config_record, sort_keys=True)

    def log(self, record: dict[str, Any]) -> None:
        if dist.is_main():
            append_jsonl(self.metrics_path, record)

    def save(self, at_step: int, elapsed: float) -> None:
        """A checkpoint of step ``at_step`` (a collective under FSDP: every rank calls), written by rank 0."""
        weights = dist.full_state_dict(self.train_model)  # FSDP: every rank gathers; None otherwise
        opt_state = dist.full_optimizer_state(self.optimizer, self.train_model)
        if not dist.is_main():
            return
        state = {
            "step": at_step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": elapsed,
            "sampler": self.sampler.state_dict(),
            "world_size": self.ctx.world_size,
        }
        path = ckpt.checkpoint_step_dir(self.out, at_step)
        try:
            ckpt.save_checkpoint(
                path,
                model=self.model,
                weights=weights,
                config={**self.config_record, "step": at_step},
                tokenizer_json=self.stage.tokenizer_json,
                training_state=state,
                optimizer=opt_state if opt_state is not None else self.optimizer,
            )
        except OSError as e:
            last = ckpt.list_checkpoints(self.out)
            raise ckpt.CheckpointError(
                f"could not write checkpoint {path} at step {at_step} of stage {self.stage.kind} ({e}); "
                f"the previous checkpoint {last[-1] if last else '(none)'} is intact. "
                "Free disk space and resume with --resume"
            ) from e
        ckpt.prune_checkpoints(self.out, self.cfg.keep_checkpoints)

    def train(self, progress: bool) -> dict[str, Any]:
        """Optimizer steps up to ``max_steps``, a signal or the time limit, with logging, evaluation and checkpoints."""
        cfg = self.cfg
        start_time = time.perf_counter()
        last_eval: dict[str, str] = {}
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=f"train {self.stage.kind}",
            disable=not (progress and dist.is_main()),
            dynamic_ncols=True,
        )
        window_tokens, window_start = 0, time.perf_counter()
        with _StopFlag() as stop:
            while self.step < cfg.max_steps:
                lr = lr_at(self.step, cfg)
                totals, loss_value, grad_norm, finite = self._optimizer_step(lr, bar)
                self.step += 1
                elapsed = self.elapsed_before + time.perf_counter() - start_time
                bar.update(1)
                if finite:
                    self.tokens_seen += cfg.batch_tokens
                    window_tokens += cfg.batch_tokens
                if finite and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_start, 1e-9)
                    window_tokens, window_start = 0, now
                    self._log_train(totals, lr, grad_norm, elapsed, tps)
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:.0f}", **last_eval)
                stopping, timed_out = dist.any_rank(
                    stop.signum is not None, cfg.max_minutes is not None and elapsed >= cfg.max_minutes * 60
                )
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps or timed_out:
                    last_eval = self._evaluate(elapsed)
                if self.step % cfg.save_every == 0 or self.step == cfg.max_steps or timed_out or stopping:
                    self.save(self.step, elapsed)
                if stopping:
                    bar.close()
                    raise SystemExit(f"stopped by signal at step {self.step}; checkpoint saved, resume with --resume")
                if timed_out:
                    if dist.is_main():
                        print(f"time limit of {cfg.max_minutes} min reached at step {self.step}")
                    break
        bar.close()
        return {"step": self.step, "tokens": self.tokens_seen, **last_eval}

    def _optimizer_step(self, lr: float, bar: tqdm) -> tuple[dict[str, float], float, torch.Tensor, bool]:
        """Accumulate the global batch's gradients, clip, and step unless the loss or gradient is non-finite;
        returns (mean metrics of the micro-batches, mean loss over ranks, gradient norm, whether it stepped)."""
        cfg, ctx, accum = self.cfg, self.ctx, self.accum
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_model.train()
        totals: dict[str, float] = {}
        for micro in range(accum):
            indices = self.sampler.next_indices()
            torch.manual_seed(micro_batch_seed(cfg.seed, self.step, micro * ctx.world_size + ctx.rank))
            batch = self.stage.make_batch(indices, self.device)
            sync = dist.no_sync(self.train_model) if micro < accum - 1 else nullcontext()
            with sync:
                with autocast(self.device, self.precision):
                    loss, metrics = self.stage.loss(self.train_model, batch)
                (loss / accum).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / accum
        grad_norm = dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        loss_value = dist.all_reduce_mean(totals.get("loss", float(loss.detach())))
        finite = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        else:
            self._skip_nonfinite(loss_value, grad_norm, bar)
        self.optimizer.zero_grad(set_to_none=True)
        return totals, loss_value, grad_norm, finite

    def _skip_nonfinite(self, loss_value: float, grad_norm: torch.Tensor, bar: tqdm) -> None:
        """Stop with NonFiniteError, or with ``skip_nonfinite`` warn and log the skipped step."""
        what = "loss" if not math.isfinite(loss_value) else "gradient"
        msg = (
            f"non-finite {what} at step {self.step + 1} of stage {self.stage.kind} "
            f"(loss={loss_value}, grad_norm={float(grad_norm)})"
        )
        if not self.cfg.skip_nonfinite:
            bar.close()
            last = ckpt.list_checkpoints(self.out)
            raise NonFiniteError(
                f"{msg}; the last good checkpoint is {last[-1] if last else '(none)'}. "
                "Lower the learning rate, resume with --resume, or pass --skip-nonfinite to skip "
                "bad steps"
            )
        if dist.is_main():
            print(f"warning: {msg}; skipping this step (--skip-nonfinite)")
        self.log({"step": self.step + 1, "split": "train", "skipped_nonfinite": True})

    def _log_train(
        self, totals: dict[str, float], lr: float, grad_norm: torch.Tensor, elapsed: float, tokens_per_s: float
    ) -> None:
        record = {
            "step": self.step,
            "split": "train",
            "tokens": self.tokens_seen,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(tokens_per_s, 1),
            **{k: round(dist.all_reduce_mean(v), 6) for k, v in totals.items()},
        }
        if self.stage.flops_per_token:
            record["train_flops"] = self.stage.flops_per_token * self.tokens_seen
        self.log(record)

    def _evaluate(self, elapsed: float) -> dict[str, str]:
        """The stage's evaluation, logged; returns its first two values for the progress bar."""
        torch.manual_seed(micro_batch_seed(self.cfg.seed, self.step, 0, _EVAL_RNG))  # same on every rank
        with dist.evaluation(self.train_model):
            ev = self.stage.evaluate(self.model, self.device)
        self.log(
            {
                "step": self.step,
                "split": "val",
                "tokens": self.tokens_seen,
                "elapsed_s": round(elapsed, 3),
                **ev,
            }
        )
        return {k: f"{v:.4g}" for k, v in list(ev.items())[:2]}
