"""``calm bench generate``: decoding speed of CALM against the token-level Transformer with the same backbone.

Decoding speed is the practical side of the paper's inference-FLOPs claim (Table 1): one
backbone step yields K = 4 tokens (paper §3-§4), but each step also runs the energy head and the
autoencoder decoder, whose vocabulary projection is as large as a Transformer's LM head;
likelihood-free temperature sampling (paper §6, Alg. 2) runs head and decoder N = 200 times per step.
Both models get random (seeded) weights of the same backbone, vocabulary and context, batch 1, a
KV cache, a 128-token prompt and 512 new tokens, timed interleaved in one process. It reports
tokens/s for greedy decoding (GPT argmax vs CALM at T = 1, one head sample per step) and at
T = 1/2 (GPT softmax sampling vs CALM's batch approximation with N = 200), and a per-step profile
of where the time goes.

Random weights cost the same FLOPs and bytes as trained ones. What they do not reproduce is how
peaked the decoder's logits are and so which candidates come out, which matters only to the cheap
batch selection (and to any shortcut in the vocabulary argmax, for which flat random logits are
the pessimistic case; see ``benchmarks/decode_argmax.py``). Figures: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from calm.bench.common import build_pair, log, median, run_header, run_record, sync
from calm.checkpoint import fast_argmax_screens
from calm.config import ConfigError
from calm.generate.engine import generate
from calm.hardware import bf16_is_fast, cpu_has_native_bf16, probe_record, resolve_precision
from calm.io import to_json
from calm.models.calm import CALM
from calm.models.flops import calm_flops, gpt_flops
from calm.models.gpt import GPT


def run_calm(
    model: CALM,
    prompt: torch.Tensor,
    new_tokens: int,
    temperature: float,
    num_samples: int,
    seed: int = 0,
    fast: bool = True,
) -> tuple[float, list[int]]:
    """(wall-clock seconds, new tokens) of one ``calm.generate.engine.generate`` call (prefill included).

    ``fast=False`` runs the reference path (every candidate decoded in full; ``calm.generate.lazy_decode``).
    """
    device = prompt.device
    gen = torch.Generator(device=device).manual_seed(seed)
    sync(device)
    start = time.perf_counter()
    out = generate(
        model, prompt, new_tokens, temperature=temperature, num_samples=num_samples, generator=gen, fast=fast
    )
    sync(device)
    elapsed = time.perf_counter() - start
    if len(out[0]) != new_tokens:
        raise RuntimeError(f"CALM generated {len(out[0])} tokens instead of {new_tokens}")
    return elapsed, out[0]


def time_calm(
    model: CALM, prompt: torch.Tensor, new_tokens: int, temperature: float, num_samples: int, seed: int = 0
) -> float:
    """Wall-clock seconds of one ``calm.generate.engine.generate`` call (prefill included)."""
    return run_calm(model, prompt, new_tokens, temperature, num_samples, seed)[0]


def output_check(
    model: CALM, prompt: torch.Tensor, new_tokens: dict[str, int], num_samples: int, seed: int = 0
) -> dict[str, Any]:
    """Whether the fast path gives the reference path's tokens for the same seed, per mode.

    Greedy (T = 1, one head sample) and T = 1/2 (Alg. 2, ``num_samples`` candidates), each over
    ``new_tokens[mode]`` tokens; the reference decodes every candidate in full, as the library
    did before the exact speed-ups. Also returns the reference's T = 1/2 seconds per step.
    """
    out: dict[str, Any] = {"new_tokens": dict(new_tokens)}
    for mode, temperature, n in (("greedy", 1.0, 1), ("t_half", 0.5, num_samples)):
        _, fast = run_calm(model, prompt, new_tokens[mode], temperature, n, seed)
        seconds, reference = run_calm(model, prompt, new_tokens[mode], temperature, n, seed, fast=False)
        out[f"{mode}_same_samples"] = fast == reference
        if mode == "t_half":
            out["t_half_reference_tok_s"] = new_tokens[mode] / seconds
    return out


def precision_record(model: CALM) -> dict[str, Any]:
    """The precision CALM decodes in: weight dtype, the vocabulary screen used, bf16 matmul support."""
    weight = next(model.parameters())
    dtype, device = weight.dtype, weight.device
    screen = model.autoencoder.vocab_screen(fast_argmax_screens(device).int8)
    if screen is not None:
        vocab = "int8 screen (torch._int_mm) + re-score in " + str(dtype).removeprefix("torch.")
    elif dtype == torch.float32 and device.type == "cpu" and bf16_is_fast(device):
        vocab = "fp32, bf16 screen from 2^24 logits (calm.models.vocab_search.vocab_argmax)"
    else:
        vocab = "plain " + str(dtype).removeprefix("torch.") + " product"
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_argmax": vocab,
        "bf16_native": cpu_has_native_bf16(),
        "precision_auto": resolve_precision("auto", device),  # the same keys as `calm bench train`
        "precision_probe": probe_record(device),
    }


def time_gpt(model: GPT, prompt: torch.Tensor, new_tokens: int, temperature: float, seed: int = 0) -> float:
    """Wall-clock seconds of one ``GPT.generate`` call (prefill included); temperature 0 is argmax."""
    device = prompt.device
    gen = torch.Generator(device=device).manual_seed(seed)
    sync(device)
    start = time.perf_counter()
    out = model.generate(prompt, new_tokens, temperature=temperature, generator=gen)
    sync(device)
    elapsed = time.perf_counter() - start
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"GPT generated {out.shape[1] - prompt.shape[1]} tokens instead of {new_tokens}")
    return elapsed


@contextmanager
def timed_calls(targets: list[tuple[object, str, str]], device: torch.device) -> Iterator[dict[str, list[float]]]:
    """Time every call of ``obj.attr`` under ``name`` while the context is open.

    Each method is shadowed by an instance attribute that wraps the original with
    ``perf_counter`` (and a CUDA sync on both sides), and removed again on exit, so the profiled
    run goes through the library's own generation loop. A nested call (``decode_hidden`` inside
    ``decode_ids``) is counted in both names.
    """
    calls: dict[str, list[float]] = {name: [] for _, _, name in targets}

    def wrap(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            calls[name].append(time.perf_counter() - start)
            return out

        return timed

    for obj, attr, name in targets:
        if attr in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{attr} is already shadowed; cannot profile it")
        setattr(obj, attr, wrap(getattr(obj, attr), name))
    try:
        yield calls
    finally:
        for obj, attr, _ in targets:
            delattr(obj, attr)


def _split(total_s: float, parts_s: dict[str, float], steps: int, unit: str) -> dict[str, Any]:
    """Per-step milliseconds of each part, ``sampler_other`` = the remainder, and fractions."""
    per_step = {k: 1e3 * v / steps for k, v in parts_s.items()}
    per_step["sampler_other"] = max(0.0, 1e3 * total_s / steps - sum(per_step.values()))
    total_ms = sum(per_step.values())
    return {
        f"ms_per_{unit}": {k: round(v, 3) for k, v in per_step.items()},
        "fraction": {k: round(v / total_ms, 4) for k, v in per_step.items()},
        f"total_ms_per_{unit}": round(total_ms, 3),
        f"{unit}s": steps,
    }


def profile_calm(
    model: CALM, prompt: torch.Tensor, new_tokens: int, temperature: float, num_samples: int, seed: int = 0
) -> dict[str, Any]:
    """Where one CALM generation's time goes, per backbone step (prefill reported apart).

    backbone = input compression + Transformer with KV cache (``hidden_states``); head = the
    energy head's S samples incl. noise (``CALM.sample_next``); ae_decoder = the autoencoder decoder,
    split in ``detail`` into the trunk (its layers, whichever rows the sampler decodes) and the
    tied vocabulary projection + argmax (``Autoencoder.vocab_argmax``, with the rows it got per
    step); sampler_other = the rest (Alg. 2 selection, the lazy path's bookkeeping, Python loop).
    """
    ae, device = model.autoencoder, prompt.device
    trunk = (ae.latent_to_hidden, ae.dec_chunk_layers, ae.expand_layer, ae.dec_token_layers, ae.dec_norm)
    targets = [
        (model, "hidden_states", "backbone"),
        (model, "sample_next", "head"),  # the head's samples (and an anchored head's first-token draws)
        (ae, "vocab_argmax", "ae_vocab_argmax"),
        *((module, "forward", f"ae_trunk_{i}") for i, module in enumerate(trunk)),
    ]
    rows: list[int] = []
    with timed_calls(targets, device) as calls:
        timed_argmax = ae.vocab_argmax

        def counting(hidden: torch.Tensor) -> torch.Tensor:
            rows.append(hidden.shape[0])
            return timed_argmax(hidden)

        ae.vocab_argmax = counting  # type: ignore[method-assign]  # removed again by timed_calls
        total = time_calm(model, prompt, new_tokens, temperature, num_samples, seed)
    prefill = calls["backbone"].pop(0)
    steps = len(calls["head"])
    trunk_s = sum(sum(calls[f"ae_trunk_{i}"]) for i in range(len(trunk)))
    parts = {"backbone": sum(calls["backbone"]), "head": sum(calls["head"])}
    parts["ae_decoder"] = trunk_s + sum(calls["ae_vocab_argmax"])
    out = _split(total - prefill, parts, steps, "step")
    out["detail"] = {
        "ae_decoder_trunk_ms": round(1e3 * trunk_s / steps, 3),
        "ae_vocab_projection_argmax_ms": round(1e3 * sum(calls["ae_vocab_argmax"]) / steps, 3),
        "vocab_argmax_rows_per_step": round(sum(rows) / steps, 2),
    }
    out["prefill_ms"] = round(1e3 * prefill, 3)
    out["tokens_per_step"] = model.chunk_size
    return out


def profile_gpt(model: GPT, prompt: torch.Tensor, new_tokens: int, temperature: float, seed: int = 0) -> dict[str, Any]:
    """Where one GPT generation's time goes, per token: backbone, lm_head, sampler_other (rest)."""
    targets = [(model.backbone, "forward", "backbone"), (model.lm_head, "forward", "lm_head")]
    with timed_calls(targets, prompt.device) as calls:
        total = time_gpt(model, prompt, new_tokens, temperature, seed)
    prefill = calls["backbone"].pop(0) + calls["lm_head"].pop(0)
    parts = {name: sum(calls[name]) for name in ("backbone", "lm_head")}
    out = _split(total - prefill, parts, new_tokens, "token")
    out["prefill_ms"] = round(1e3 * prefill, 3)
    return out


def distinct_candidates(model: CALM, prompt: torch.Tensor, num_samples: int, seed: int = 0) -> int:
    """How many distinct chunks N head samples decode to after the prompt (the sampler's input)."""
    K = model.chunk_size
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    with torch.no_grad():
        h = model.hidden_states(prompt.view(1, -1, K))[:, -1]
        ids = model.draw_chunks(h, num_samples, gen)[:, 0]
    return len({tuple(row) for row in ids.tolist()})


def weight_bytes_per_token(calm: CALM, gpt: GPT) -> dict[str, float]:
    """Bytes of weights one decoding step streams, per generated token.

    At batch 1 a decoding step is a chain of matrix-vector products, so on a CPU its time follows
    the bytes of weights read more than the FLOPs: GPT reads its blocks and LM head per token;
    CALM reads input compression, blocks, head and AE decoder (incl. the tied V×d table) once per
    K tokens, whatever the number of head samples. Embedding lookups read one row and are left out.
    """

    def size(*modules: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    ae = calm.autoencoder
    decoder = (ae.latent_to_hidden, ae.dec_chunk_layers, ae.expand_layer, ae.dec_token_layers, ae.dec_norm)
    calm_step = size(calm.embed_proj, calm.backbone, calm.head, *decoder, ae.embed_tokens)
    return {"gpt": float(size(gpt.backbone, gpt.lm_head)), "calm": calm_step / calm.chunk_size}


def bench_generate_size(
    size: str,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 512,
    t_half_new_tokens: int | None = None,
    repeats: int = 3,
    warmup: int = 1,
    num_samples: int = 200,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    profile_tokens: int | None = 128,
    check_tokens_t_half: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy and T = 1/2 decoding tokens/s of CALM and GPT of one size, timed interleaved.

    Each repetition runs CALM greedy, GPT greedy, CALM T=1/2, GPT T=1/2 in turn. Greedy runs
    decode ``new_tokens``; T = 1/2 runs ``t_half_new_tokens`` (default ``new_tokens``), because
    CALM's 200 candidates per step cost seconds per step at paper size on a CPU. Warm-up runs
    decode min(tokens, 64) in each mode. Returns medians, every repetition, the CALM/GPT ratios
    and one instrumented run per mode over min(tokens, ``profile_tokens``) new tokens (None: no
    profile; per-step costs barely depend on the position at these lengths), the precision, and
    the output check (:func:`output_check`; T = 1/2 over ``check_tokens_t_half`` tokens, since the
    reference path costs seconds per step at paper size).
    """
    device = torch.device(device)
    tokens = {"greedy": new_tokens, "t_half": t_half_new_tokens or new_tokens}
    # the GPT needs prompt + new tokens of context (the tiny presets have 256); CALM gets the same
    context = prompt_tokens + max(tokens.values())
    calm, gpt = build_pair(size, min_context=context, device=device, seed=seed)
    K = calm.chunk_size
    if prompt_tokens % K != 0 or prompt_tokens < K:
        raise ConfigError(f"--prompt-tokens={prompt_tokens} must be a positive multiple of K={K}")
    calm, gpt = calm.to(dtype), gpt.to(dtype)
    vocab = calm.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    prompt = prompt.to(device)
    times = _time_interleaved(size, calm, gpt, prompt, tokens, num_samples, repeats, warmup, seed)
    result = _rates(times, tokens)
    result["analytic_flops_per_token"] = _analytic_flops(calm, gpt, context, num_samples)
    result["weight_bytes_per_token"] = weight_bytes_per_token(calm, gpt)
    result["distinct_of_n_candidates"] = distinct_candidates(calm, prompt, num_samples, seed)
    result["precision"] = precision_record(calm)
    check_tokens = {"greedy": min(tokens["greedy"], 64), "t_half": min(tokens["t_half"], check_tokens_t_half)}
    result["output_check"] = output_check(calm, prompt, check_tokens, num_samples, seed)
    check = result["output_check"]
    same = f"greedy {check['greedy_same_samples']}, T=1/2 {check['t_half_same_samples']}"
    log(f"[{size}] output check, same samples as the reference path: {same}")
    result["setup"] = {
        "layers": gpt.config.num_layers,
        "hidden_size": gpt.config.hidden_size,
        "heads": gpt.config.num_heads,
        "vocab_size": vocab,
        "context": calm.config.max_seq_len,
        "chunk_size": K,
        "autoencoder_hidden_size": calm.autoencoder.config.hidden_size,
        "calm_params": calm.num_parameters(),
        "gpt_params": gpt.num_parameters(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": tokens["greedy"],
        "t_half_new_tokens": tokens["t_half"],
        "repeats": repeats,
        "warmup": warmup,
        "num_samples": num_samples,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if profile_tokens:
        result["profile"] = _profiles(calm, gpt, prompt, tokens, profile_tokens, num_samples, seed)
        log(f"[{size}] profile done")
    return result


def _analytic_flops(calm: CALM, gpt: GPT, context: int, num_samples: int) -> dict[str, float]:
    """Inference FLOPs per token (``calm.models.flops``) of the GPT and of CALM greedy and at T = 1/2 with
    ``num_samples`` candidates, at a context of ``context`` tokens."""
    K, ae_config = calm.chunk_size, calm.autoencoder.config
    return {
        "gpt": gpt_flops(gpt.config, context=context)["inference_flops_per_token"],
        "calm_greedy": calm_flops(calm.config, ae_config, context=context // K)["inference_flops_per_token"],
        "calm_t_half": calm_flops(calm.config, ae_config, context=context // K, num_samples_inference=num_samples)[
            "inference_flops_per_token"
        ],
    }


def _time_interleaved(
    size: str,
    calm: CALM,
    gpt: GPT,
    prompt: torch.Tensor,
    tokens: dict[str, int],
    num_samples: int,
    repeats: int,
    warmup: int,
    seed: int,
) -> dict[str, list[float]]:
    """Seconds of every timed run, {"calm_greedy": [...], "gpt_greedy": [...], ...}, after ``warmup`` rounds.

    Each repetition runs every mode of ``tokens`` (greedy, t_half) for CALM, then the GPT, so each CALM
    run and the GPT run of the same mode are adjacent.
    """
    sampling = {"greedy": (1.0, 1, 0.0), "t_half": (0.5, num_samples, 0.5)}  # CALM T, CALM N, GPT T

    def run(model_name: str, mode: str, n: int) -> float:
        calm_t, calm_n, gpt_t = sampling[mode]
        if model_name == "calm":
            return time_calm(calm, prompt, n, calm_t, calm_n, seed)
        return time_gpt(gpt, prompt, n, gpt_t, seed)

    for i in range(warmup):
        for mode in tokens:
            for model_name in ("calm", "gpt"):
                run(model_name, mode, min(tokens[mode], 64))
        log(f"[{size}] warm-up {i + 1}/{warmup} done")
    times: dict[str, list[float]] = {f"{m}_{mode}": [] for mode in tokens for m in ("calm", "gpt")}
    for rep in range(repeats):
        for mode, n in tokens.items():
            for model_name in ("calm", "gpt"):
                seconds = run(model_name, mode, n)
                times[f"{model_name}_{mode}"].append(seconds)
                rate = f"{n / seconds:,.1f} tok/s ({seconds:.1f} s)"
                log(f"[{size}] rep {rep + 1}/{repeats} {model_name} {mode}: {rate}")
    return times


def _rates(times: dict[str, list[float]], tokens: dict[str, int]) -> dict[str, Any]:
    """Median tokens/s of each model and mode, the CALM/GPT ratio of the medians and the median of the
    paired ratios, and every run's tokens/s (``runs_tok_s``)."""
    result: dict[str, Any] = {}
    for mode, n in tokens.items():
        calm_tps = n / median(times[f"calm_{mode}"])
        gpt_tps = n / median(times[f"gpt_{mode}"])
        result[f"{mode}_ratio"] = calm_tps / gpt_tps
        result[f"calm_{mode}_tok_s"] = calm_tps
        result[f"gpt_{mode}_tok_s"] = gpt_tps
        # each repetition's CALM run and GPT run are adjacent, so their ratio shares the machine's load
        paired = [g / c for c, g in zip(times[f"calm_{mode}"], times[f"gpt_{mode}"], strict=True)]
        result[f"{mode}_ratio_paired"] = median(paired)
    result["runs_tok_s"] = {k: [round(tokens[k.split("_", 1)[1]] / s, 2) for s in v] for k, v in times.items()}
    return result


def _profiles(
    calm: CALM,
    gpt: GPT,
    prompt: torch.Tensor,
    tokens: dict[str, int],
    profile_tokens: int,
    num_samples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """One instrumented run per model and mode over min(tokens, ``profile_tokens``) new tokens."""
    greedy_n, half_n = (min(tokens[m], profile_tokens) for m in ("greedy", "t_half"))
    return {
        "calm_greedy": profile_calm(calm, prompt, greedy_n, 1.0, 1, seed),
        "gpt_greedy": profile_gpt(gpt, prompt, greedy_n, 0.0, seed),
        "calm_t_half": profile_calm(calm, prompt, half_n, 0.5, num_samples, seed),
        "gpt_t_half": profile_gpt(gpt, prompt, half_n, 0.5, seed),
    }


def bench_generate(
    sizes: list[str],
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 512,
    t_half_new_tokens: int | None = None,
    repeats: int | None = None,
    warmup: int = 1,
    num_samples: int = 200,
    device: str = "cpu",
    dtype: str = "fp32",
    threads: int | None = None,
    profile_tokens: int | None = 128,
    check_tokens: int = 16,
) -> dict[str, Any]:
    """``calm bench generate`` as a function: {size: result, "device", "torch", "threads"}.

    Defaults sized for a 2-core CPU: ``repeats`` is 5 for tiny and 3 otherwise;
    ``t_half_new_tokens`` is ``new_tokens`` for tiny and 128 otherwise.
    """
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    load_start = list(os.getloadavg())
    out: dict[str, Any] = {}
    for size in sizes:
        log(f"[{size}] building models")
        out[size] = bench_generate_size(
            size,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            t_half_new_tokens=t_half_new_tokens or (new_tokens if size == "tiny" else min(new_tokens, 128)),
            repeats=repeats or (5 if size == "tiny" else 3),
            warmup=warmup,
            num_samples=num_samples,
            device=device,
            dtype=torch_dtype,
            profile_tokens=profile_tokens,
            check_tokens_t_half=check_tokens,
        )
    out.update(run_record(device, load_start))
    return out


def _print_generate(result: dict[str, Any]) -> None:
    print(run_header(result))
    print(f"{'size':<5} {'mode':<7} {'CALM tok/s':>11} {'GPT tok/s':>10} {'CALM/GPT':>9} {'paired':>9}")
    sizes = [k for k, v in result.items() if isinstance(v, dict)]
    for size in sizes:
        r = result[size]
        for mode, label in (("greedy", "greedy"), ("t_half", "T=1/2")):
            calm_tps, gpt_tps = r[f"calm_{mode}_tok_s"], r[f"gpt_{mode}_tok_s"]
            ratio, paired = r[f"{mode}_ratio"], r[f"{mode}_ratio_paired"]
            print(f"{size:<5} {label:<7} {calm_tps:>11.1f} {gpt_tps:>10.1f} {ratio:>8.2f}x {paired:>8.2f}x")
    for size in sizes:
        r = result[size]
        check, precision = r["output_check"], r["precision"]
        print(
            f"{size}: {precision['dtype']} weights, vocabulary argmax: {precision['vocab_argmax']}; "
            f"same samples as the reference path for seed 0: greedy {check['greedy_same_samples']} "
            f"({check['new_tokens']['greedy']} tokens), T=1/2 {check['t_half_same_samples']} "
            f"({check['new_tokens']['t_half']} tokens; reference {check['t_half_reference_tok_s']:.2f} tok/s)"
        )
    for size in sizes:
        for name, prof in result[size].get("profile", {}).items():
            unit = "step" if name.startswith("calm") else "token"
            parts = ", ".join(
                f"{k} {v:.1f} ms ({100 * prof['fraction'][k]:.0f}%)" for k, v in prof[f"ms_per_{unit}"].items()
            )
            print(f"profile {size} {name}: {prof[f'total_ms_per_{unit}']:.1f} ms/{unit} = {parts}")
            if "detail" in prof:
                print(f"    ae_decoder = {', '.join(f'{k} {v:.1f}' for k, v in prof['detail'].items())}")


def cmd_bench_generate(args: argparse.Namespace) -> int:
    result = bench_generate(
        args.sizes,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        t_half_new_tokens=args.t_half_new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        num_samples=args.num_samples,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        profile_tokens=None if args.no_profile else args.profile_tokens,
        check_tokens=args.check_tokens,
    )
    if args.json:
        print(to_json(result, indent=2))
    else:
        _print_generate(result)
    return 0
