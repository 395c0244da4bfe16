"""One training loop for every stage: the autoencoder, CALM and the token baseline.

The stage (``calm.train.stages``) decides the model, its trainable parameters, how a batch is built from
item indices, the loss and the periodic evaluation. This loop owns everything else: AdamW with the
paper's recipe (β = (0.9, 0.95), weight decay 0.1 on matrices only, grad clip 1.0; paper §7.1),
warm-up and decay, gradient accumulation derived from a global batch in tokens, bf16
autocast, progress bars, ``metrics.jsonl`` logging, periodic checkpoints, exact resume (model,
optimizer, RNG and data position), SIGTERM handling and non-finite guards.

Under ``torchrun`` every rank runs this loop on its slice of each global batch (``calm.train.distributed``
wraps the model in DDP or FSDP2); rank 0 logs and writes. Each micro-batch's noise is seeded by its
position in the global batch (``micro_batch_seed``), so results do not depend on the world size
or on interruptions. See docs/guides/distributed.md.
"""

from __future__ import annotations

import math
import signal
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


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only (biases and norm gains are not decayed)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


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
    """Set by SIGTERM/SIGINT so the loop can write a final checkpoint before exiting."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM,):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

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
            import shutil

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


def _check_resumable(resume_from: Path, saved: dict[str, Any], stage: Stage) -> None:
    """The checkpoint (``saved``: its config.json) must belong to this stage, tokenizer and model configuration."""
    current = stage.checkpoint_config()
    if saved["kind"] != stage.kind:
        raise ckpt.CheckpointError(
            f"{resume_from} is a {saved['kind']} checkpoint but this is a {stage.kind} run; "
            f"pick the run directory of a {stage.kind} run or start a new one"
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
) -> dict[str, Any]:
    """Train ``stage`` under ``cfg`` into the run directory ``out``; return the final metrics.

    Under ``torchrun`` every rank calls this; rank 0 logs and writes. Resuming (``resume=True``)
    restores weights, optimizer moments, data position and RNG from the newest complete checkpoint,
    and the continuation is bit-identical to an unbroken run on CPU.
    """
    out = Path(out)
    ctx = dist.context()
    device = device or ctx.device
    cfg.validate(ctx.world_size)
    accum = cfg.grad_accum_steps(ctx.world_size)
    micro_tokens = cfg.batch_tokens // (accum * ctx.world_size)
    if micro_tokens % stage.tokens_per_item != 0:
        raise ConfigError(
            f"micro-batch of {micro_tokens} tokens is not a multiple of the {stage.tokens_per_item} tokens per "
            f"training item; set batch_tokens/micro_batch_tokens to a multiple of {stage.tokens_per_item}"
        )
    items_per_rank = micro_tokens // stage.tokens_per_item
    sampler = BatchSampler(stage.num_items, items_per_rank, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    resume_from = prepare_run_dir(out, resume, overwrite)
    meta: dict[str, Any] = {}
    saved: dict[str, Any] | None = None
    if resume_from is not None:  # read and check everything before touching a file
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
    optimizer = build_optimizer(params, cfg)
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if resume_from is not None:
        opt_state = ckpt.optimizer_state_from_tensors(state_tensors, meta["optimizer"])
        dist.load_optimizer_state(optimizer, train_model, opt_state)
        sampler.load_state_dict(meta["sampler"])
        ckpt.restore_rng_state(state_tensors, meta["rng"])
        step, tokens_seen, elapsed_before = meta["step"], meta["tokens_seen"], meta.get("elapsed_s", 0.0)
        del state_tensors
    if cfg.compile:
        train_model = torch.compile(train_model)

    metrics_path = out / "metrics.jsonl"
    config_record = {
        **stage.checkpoint_config(),
        "train": {**asdict(cfg), "precision": precision, "precision_requested": cfg.precision},
    }
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            ckpt.clean_incomplete(out)  # leftovers of a write that a crash interrupted
            _truncate_metrics(metrics_path, step)
            if resume_from is not None:
                print(f"resuming {stage.kind} from {resume_from} at step {step}")
        write_json(out / "run_config.json", config_record, sort_keys=True)

    def save(at_step: int, elapsed: float) -> None:
        weights = dist.full_state_dict(train_model)  # FSDP: every rank gathers; None otherwise
        opt_state = dist.full_optimizer_state(optimizer, train_model)
        if not dist.is_main():
            return
        state = {
            "step": at_step,
            "tokens_seen": tokens_seen,
            "elapsed_s": elapsed,
            "sampler": sampler.state_dict(),
            "world_size": ctx.world_size,
        }
        path = ckpt.checkpoint_step_dir(out, at_step)
        try:
            ckpt.save_checkpoint(
                path,
                model=model,
                weights=weights,
                config={**config_record, "step": at_step},
                tokenizer_json=stage.tokenizer_json,
                training_state=state,
                optimizer=opt_state if opt_state is not None else optimizer,
            )
        except OSError as e:
            last = ckpt.list_checkpoints(out)
            raise ckpt.CheckpointError(
                f"could not write checkpoint {path} at step {at_step} of stage {stage.kind} ({e}); "
                f"the previous checkpoint {last[-1] if last else '(none)'} is intact. "
                "Free disk space and resume with --resume"
            ) from e
        ckpt.prune_checkpoints(out, cfg.keep_checkpoints)

    def log(record: dict[str, Any]) -> None:
        if dist.is_main():
            append_jsonl(metrics_path, record)

    start_time = time.perf_counter()
    last_eval: dict[str, float] = {}
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc=f"train {stage.kind}",
        disable=not (progress and dist.is_main()),
        dynamic_ncols=True,
    )
    window_tokens, window_start = 0, time.perf_counter()
    with _StopFlag() as stop:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            train_model.train()
            totals: dict[str, float] = {}
            for micro in range(accum):
                indices = sampler.next_indices()
                torch.manual_seed(micro_batch_seed(cfg.seed, step, micro * ctx.world_size + ctx.rank))
                batch = stage.make_batch(indices, device)
                sync = dist.no_sync(train_model) if micro < accum - 1 else nullcontext()
                with sync:
                    with autocast(device, precision):
                        loss, metrics = stage.loss(train_model, batch)
                    (loss / accum).backward()
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v) / accum
            grad_norm = dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            loss_value = dist.all_reduce_mean(totals.get("loss", float(loss.detach())))
            finite = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
            else:
                what = "loss" if not math.isfinite(loss_value) else "gradient"
                msg = (
                    f"non-finite {what} at step {step + 1} of stage {stage.kind} "
                    f"(loss={loss_value}, grad_norm={float(grad_norm)})"
                )
                if not cfg.skip_nonfinite:
                    bar.close()
                    last = ckpt.list_checkpoints(out)
                    raise NonFiniteError(
                        f"{msg}; the last good checkpoint is {last[-1] if last else '(none)'}. "
                        "Lower the learning rate, resume with --resume, or pass --skip-nonfinite to skip "
                        "bad steps"
                    )
                if dist.is_main():
                    print(f"warning: {msg}; skipping this step (--skip-nonfinite)")
                log({"step": step + 1, "split": "train", "skipped_nonfinite": True})
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = elapsed_before + time.perf_counter() - start_time
            bar.update(1)
            if finite:
                tokens_seen += cfg.batch_tokens
                window_tokens += cfg.batch_tokens
            if finite and (step % cfg.log_every == 0 or step == cfg.max_steps):
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_tokens, window_start = 0, now
                record = {
                    "step": step,
                    "split": "train",
                    "tokens": tokens_seen,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "elapsed_s": round(elapsed, 3),
                    "tokens_per_s": round(tps, 1),
                    **{k: round(dist.all_reduce_mean(v), 6) for k, v in totals.items()},
                }
                if stage.flops_per_token:
                    record["train_flops"] = stage.flops_per_token * tokens_seen
                log(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:.0f}", **last_eval)
            stopping, timed_out = dist.any_rank(
                stop.signum is not None, cfg.max_minutes is not None and elapsed >= cfg.max_minutes * 60
            )
            if step % cfg.eval_every == 0 or step == cfg.max_steps or timed_out:
                torch.manual_seed(micro_batch_seed(cfg.seed, step, 0, _EVAL_RNG))  # same on every rank
                with dist.evaluation(train_model):
                    ev = stage.evaluate(model, device)
                log(
                    {
                        "step": step,
                        "split": "val",
                        "tokens": tokens_seen,
                        "elapsed_s": round(elapsed, 3),
                        **ev,
                    }
                )
                last_eval = {k: f"{v:.4g}" for k, v in list(ev.items())[:2]}
            if step % cfg.save_every == 0 or step == cfg.max_steps or timed_out or stopping:
                save(step, elapsed)
            if stopping:
                bar.close()
                raise SystemExit(f"stopped by signal at step {step}; checkpoint saved, resume with --resume")
            if timed_out:
                if dist.is_main():
                    print(f"time limit of {cfg.max_minutes} min reached at step {step}")
                break
    bar.close()
    return {"step": step, "tokens": tokens_seen, **last_eval}
