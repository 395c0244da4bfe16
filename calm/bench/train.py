"""``calm bench train``: training tokens/s and model-FLOPs utilisation of CALM and the GPT baseline.

Training FLOPs per token are analytic (``calm.models.flops``, paper Table 1); tokens/s is
measured on the library's own training step (``calm.train.loop``: forward, backward, clip, AdamW) on
random token blocks, CALM and GPT interleaved; MFU divides the achieved FLOP/s by a matmul peak
measured in the same run on the same device. Figures: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from calm.bench.common import build_pair, log, median, run_header, run_record, sync
from calm.config import ConfigError, TrainConfig, load_preset
from calm.hardware import autocast, bf16_is_fast, probe_record, resolve_precision
from calm.io import to_json
from calm.models.flops import calm_flops, gpt_flops
from calm.train.loop import build_optimizer


def measure_matmul_peak(device: torch.device | str, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Median FLOP/s of ``size``×``size`` matmuls in ``dtype``: the denominator of MFU."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for i in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 2:  # two warm-up products
            times.append(time.perf_counter() - start)
    return 2 * size**3 / median(times)


def _train_step(
    kind: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    batch: torch.Tensor,
    precision: str,
) -> float:
    """One forward + backward + clip + AdamW step as ``calm.train.loop`` runs it; returns seconds."""
    device = batch.device
    sync(device)
    start = time.perf_counter()
    with autocast(device, precision):
        if kind == "calm":
            loss, _ = model(batch)
        else:  # as GPTStage.loss
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    if not math.isfinite(float(loss.detach())):
        raise RuntimeError(f"non-finite {kind} loss in the training benchmark")
    return time.perf_counter() - start


def train_shapes(size: str, context: int | None, batch_tokens: int | None) -> tuple[int, int, dict[str, int]]:
    """(context steps, batch tokens, block tokens per model), defaults filled in and checked."""
    context = context or 256
    batch_tokens = batch_tokens or (8192 if size == "tiny" else 2048)
    K = load_preset("autoencoder", "tiny" if size == "tiny" else "paper").model.chunk_size
    blocks = {"calm": context * K, "gpt": context}
    for kind, block in blocks.items():
        if batch_tokens % block != 0:
            raise ConfigError(
                f"--batch-tokens={batch_tokens} is not a multiple of the {kind} block of {block} tokens "
                f"(context {context} steps, K={K}); pick a multiple of {context * K}"
            )
    return context, batch_tokens, blocks


def bench_train_size(
    size: str,
    peaks: dict[str, float],
    *,
    steps: int = 5,
    context: int | None = None,
    batch_tokens: int | None = None,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Training tokens/s and MFU of CALM and GPT of one size, steps interleaved, per precision.

    ``context`` is in backbone steps: a GPT block is ``context`` tokens and a CALM block
    ``context``·K tokens (the presets' 2048/8192 shrunk to 256/1024 by default). Both models get
    ``batch_tokens`` tokens per optimizer step. One untimed warm-up step per model and precision,
    then the median of ``steps`` steps. The reported precision is the faster one.
    """
    device = torch.device(device)
    context, batch_tokens, blocks = train_shapes(size, context, batch_tokens)
    calm, gpt = build_pair(size, context=context, device=device, seed=seed)
    K, vocab = calm.chunk_size, calm.config.vocab_size
    models: dict[str, nn.Module] = {"calm": calm, "gpt": gpt}
    params = {"calm": calm.trainable_parameters(), "gpt": list(gpt.parameters())}
    flops = {
        "calm": calm_flops(calm.config, calm.autoencoder.config, context=context, attention="causal"),
        "gpt": gpt_flops(gpt.config, context=context, attention="causal"),
    }
    gen = torch.Generator().manual_seed(seed)
    batches = {
        kind: torch.randint(0, vocab, (batch_tokens // block, block), generator=gen).to(device)
        for kind, block in blocks.items()
    }
    result: dict[str, Any] = {kind: {"by_precision": {}} for kind in models}
    for precision in precisions:
        optimizers = {kind: build_optimizer(params[kind], TrainConfig()) for kind in models}
        times: dict[str, list[float]] = {kind: [] for kind in models}
        for step in range(steps + 1):
            for kind, model in models.items():
                model.train()
                seconds = _train_step(kind, model, optimizers[kind], params[kind], batches[kind], precision)
                if step > 0:
                    times[kind].append(seconds)
                log(f"[{size}] {precision} {kind} step {step}/{steps}: {batch_tokens / seconds:,.0f} tok/s")
        del optimizers
        for kind in models:
            tps = batch_tokens / median(times[kind])
            achieved = tps * flops[kind]["train_flops_per_token"]
            result[kind]["by_precision"][precision] = {
                "tokens_per_s": tps,
                "mfu": achieved / peaks[precision],
                "achieved_flops": achieved,
                "step_s": times[kind],
            }
    for kind in models:
        best = max(result[kind]["by_precision"], key=lambda p: result[kind]["by_precision"][p]["tokens_per_s"])
        chosen = result[kind]["by_precision"][best]
        result[kind].update(
            tokens_per_s=chosen["tokens_per_s"],
            mfu=chosen["mfu"],
            precision=best,
            train_flops_per_token=flops[kind]["train_flops_per_token"],
            block_tokens=blocks[kind],
            sequences_per_step=batch_tokens // blocks[kind],
        )
    result["setup"] = {
        "context_steps": context,
        "batch_tokens": batch_tokens,
        "vocab_size": vocab,
        "chunk_size": K,
        "attention_flops": "causal",
        "optimizer": "AdamW + clip 1.0 (calm.train.loop recipe)",
    }
    models.clear()
    return result


def bench_train(
    sizes: list[str],
    *,
    steps: int = 5,
    context: int | None = None,
    batch_tokens: int | None = None,
    precisions: tuple[str, ...] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    peak_size: int = 2048,
) -> dict[str, Any]:
    """``calm bench train`` as a function: {"peak_flops", size: {"calm", "gpt"}, "device", ...}.

    ``precisions`` None: fp32, and bf16 too where ``calm.hardware`` finds it fast (timing emulated
    bf16 on a CPU without native kernels would take minutes and say nothing). ``precision_auto``
    in the result is what ``precision: auto`` resolves to for training on this device.
    """
    if threads:
        torch.set_num_threads(threads)
    for size in sizes:  # fail on impossible shapes before any work
        train_shapes(size, context, batch_tokens)
    if precisions is None:
        precisions = ("fp32", "bf16") if bf16_is_fast(device) else ("fp32",)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: measure_matmul_peak(device, dtypes[p], peak_size) for p in precisions}
    log("matmul peak: " + ", ".join(f"{p} {v / 1e9:,.1f} GFLOP/s" for p, v in peaks.items()))
    out: dict[str, Any] = {"peak_flops": peaks, "peak_matmul_size": peak_size}
    out["precision_auto"] = resolve_precision("auto", device)
    out["precision_probe"] = probe_record(device)
    load_start = list(os.getloadavg())
    for size in sizes:
        log(f"[{size}] building models")
        out[size] = bench_train_size(
            size,
            peaks,
            steps=steps,
            context=context,
            batch_tokens=batch_tokens,
            precisions=precisions,
            device=device,
        )
    out.update(run_record(device, load_start))
    return out


def _print_train(result: dict[str, Any]) -> None:
    print(run_header(result))
    peaks = result["peak_flops"]
    print("matmul peak: " + ", ".join(f"{p} {v / 1e9:,.1f} GFLOP/s" for p, v in peaks.items()))
    print(f"precision: auto resolves to {result['precision_auto']} here")
    print(f"{'size':<5} {'model':<5} {'precision':<9} {'tokens/s':>10} {'MFU':>7}")
    for size, r in result.items():
        if not (isinstance(r, dict) and "calm" in r):
            continue
        for kind in ("calm", "gpt"):
            for precision, p in r[kind]["by_precision"].items():
                mark = " *" if precision == r[kind]["precision"] else ""
                tps, mfu = p["tokens_per_s"], 100 * p["mfu"]
                print(f"{size:<5} {kind:<5} {precision:<9} {tps:>10,.0f} {mfu:>6.1f}%{mark}")
    print("* = the faster precision, reported as tokens_per_s / mfu")


def cmd_bench_train(args: argparse.Namespace) -> int:
    result = bench_train(
        args.sizes,
        steps=args.steps,
        context=args.context,
        batch_tokens=args.batch_tokens,
        precisions=tuple(args.precisions) if args.precisions else None,
        device=args.device,
        threads=args.threads,
        peak_size=args.peak_size,
    )
    if args.json:
        print(to_json(result, indent=2))
    else:
        _print_train(result)
    return 0
