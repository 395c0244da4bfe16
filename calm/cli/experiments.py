"""``calm demo``, ``calm report``, ``calm sweep``, ``calm bench``: whole experiments and benchmarks.

The demo (``calm.experiments.demo``), the report of a run (``calm.experiments.report``), sweeps at
a fixed budget and the paper's named ablations (``calm.experiments.sweep``, ``.studies``), and the
speed benchmarks of CALM against the GPT baseline (``calm.bench``).
"""

from __future__ import annotations

import argparse
from typing import Any

from calm.bench import SIZES
from calm.bench.generate import cmd_bench_generate
from calm.bench.train import cmd_bench_train
from calm.cli import add_threads_option
from calm.config import ConfigError, parse_override
from calm.experiments.demo import DEMO_LM_FLOPS, DEMO_VOCAB_SIZE, LM_RUNS, run_demo
from calm.experiments.run_report import write_any_report
from calm.experiments.studies import run_study
from calm.experiments.sweep import run_sweep, spec_from_cli


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job (``run_demo``): data, autoencoder, the paper's CALM, CALM-anchored (ours), the GPT,
    BrierLM on the same blocks for all three, report, samples."""
    overrides: dict[str, dict[str, Any]] = {}
    for text in args.set or []:
        key, value = parse_override(text)
        kind, _, rest = key.partition(":")
        runs = ("autoencoder", *LM_RUNS)
        if kind not in runs or not rest:
            raise ConfigError(
                f"demo override {text!r} must look like RUN:section.key=value with RUN one of "
                f"{', '.join(runs)} (calm: reaches both CALMs), e.g. calm:train.max_steps=100"
            )
        overrides.setdefault(kind, {})[rest] = value
    run_demo(
        args.out,
        corpus=args.corpus,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        ae_preset=args.ae_preset,
        lm_preset=args.lm_preset,
        eval_data=args.eval_data,
        eval_max_tokens=args.eval_max_tokens or None,
        eval_context_tokens=args.eval_context_tokens,
        overrides=overrides,
        lm_flops=args.lm_flops or None,
        progress=not args.no_progress,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild the report of a demo folder, a sweep folder or one training run from its logged metrics."""
    print(f"wrote {write_any_report(args.run)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A sweep from a YAML spec and/or the command line, or a named study (``--study``)."""
    if args.study:
        return _run_study(args)
    for flag, value in (("--scale", args.scale), ("--seeds", args.seeds)):
        if value is not None:
            raise ConfigError(f"{flag} applies to named studies: add --study NAME")
    spec = spec_from_cli(
        args.spec,
        data=args.data,
        autoencoder=args.autoencoder,
        kind=args.kind,
        name=args.name,
        preset=args.preset,
        grid=args.grid,
        sets=args.set,
        budget_flops=args.budget_flops,
        budget_tokens=args.budget_tokens,
        evals=args.evals,
        metrics=args.metrics,
    )
    run_sweep(spec, args.out, dry_run=args.dry_run, progress=not args.no_progress)
    return 0


def _run_study(args: argparse.Namespace) -> int:
    """``calm sweep --study NAME``: a named ablation (``calm.experiments.studies.run_study``)."""
    given = [flag for flag, value in (("SPEC", args.spec), ("--kind", args.kind), ("--grid", args.grid),
             ("--set", args.set), ("--name", args.name), ("--preset", args.preset),
             ("--budget-flops", args.budget_flops), ("--budget-tokens", args.budget_tokens),
             ("--metrics", args.metrics)) if value]  # fmt: skip
    if given:
        raise ConfigError(f"--study builds its own spec; drop {', '.join(given)} (or sweep a YAML spec instead)")
    seeds = 1 if args.seeds is None else args.seeds
    run_study(args.study, args.out, data=args.data, scale=args.scale, seeds=seeds, autoencoder=args.autoencoder,
              evals=args.evals, dry_run=args.dry_run, progress=not args.no_progress)  # fmt: skip
    return 0


_BENCHES = {"generate": cmd_bench_generate, "train": cmd_bench_train}


def cmd_bench(args: argparse.Namespace) -> int:
    """``calm bench generate`` or ``calm bench train`` (``calm.bench``)."""
    return _BENCHES[args.bench_command](args)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--corpus", nargs="+", default=["default"])
    p.add_argument("--tokenizer", default="train")
    p.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE)
    p.add_argument("--ae-preset", default="tiny")
    p.add_argument("--lm-preset", default="tiny", help="preset for both CALM and the GPT baseline")
    p.add_argument("--eval-data", help="evaluation text (default: the shipped WikiText-103 test set)")
    p.add_argument(
        "--eval-max-tokens", type=int, default=65536, help="score the first N tokens of the eval set (0: all)"
    )
    p.add_argument(
        "--eval-context-tokens",
        type=int,
        help="context in tokens every model is scored with (default: the longest every model has)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="RUN:KEY=VALUE",
        help="RUN: autoencoder, calm (both CALMs), calm_anchored or gpt; e.g. calm:train.max_steps=100",
    )
    p.add_argument(
        "--lm-flops",
        type=float,
        default=DEMO_LM_FLOPS,
        help=(
            f"language-model training FLOPs for each of the three language models (default {DEMO_LM_FLOPS:.2g}; "
            "0: the presets' max_steps)"
        ),
    )
    p.add_argument("--no-progress", action="store_true")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run",
        required=True,
        help="a demo folder (report.md), a sweep folder (results.*) or one training run's folder (report.md)",
    )


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "spec", nargs="?", help="YAML sweep spec (format: docs/guides/experiments.md#calm-sweep); or --study"
    )
    p.add_argument("--out", required=True, help="sweep directory: one folder per run, results.{md,csv,json,png}")
    p.add_argument("--data", help="prepared data directory (replaces the spec's)")
    p.add_argument("--autoencoder", help="autoencoder run/checkpoint for CALM groups (replaces the spec's)")
    p.add_argument("--kind", choices=["autoencoder", "calm", "gpt"], help="add one group of this stage")
    p.add_argument("--name", help="the added group's name (default: its kind)")
    p.add_argument("--preset", help="the added group's preset (default tiny)")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="a grid axis of the added group")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a fixed override of the added group")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-flops", type=float, help="training FLOPs per run")
    budget.add_argument("--budget-tokens", type=float, help="training tokens per run")
    p.add_argument("--evals", type=int, help="validation evaluations per run (default 5)")
    p.add_argument("--metrics", help="comma-separated metrics for the table and plot")
    p.add_argument(
        "--study",
        help="a named ablation of the paper: heads, input, energy-loss, ae-regularisers, "
        "latent-size, chunk-size (docs/guides/experiments.md); prepares the default data without --data",
    )
    p.add_argument(
        "--scale",
        help="with --study: the CALM preset (S, M, L, XL) at the paper's ablation budget "
        "(default: tiny, sized for one CPU thread)",
    )
    p.add_argument("--seeds", type=int, help="with --study: repeat every CALM run with seeds 1..N (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and their steps; train nothing")
    p.add_argument("--no-progress", action="store_true")


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")

    p = sub.add_parser("generate", help="decoding tokens/s, greedy and T=1/2, with a per-step profile")
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=["tiny", "S"])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=512, help="new tokens per greedy run")
    p.add_argument(
        "--t-half-new-tokens",
        type=int,
        help="new tokens per T=1/2 run (default: --new-tokens for tiny, 128 else)",
    )
    p.add_argument("--repeats", type=int, help="timed repetitions per mode (default 5 for tiny, 3 otherwise)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds of min(new tokens, 64) tokens")
    p.add_argument("--num-samples", type=int, default=200, help="N candidates of CALM's T=1/2 batch sampler")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights of both models")
    p.add_argument("--profile-tokens", type=int, default=128, help="new tokens per instrumented profile run")
    p.add_argument("--no-profile", action="store_true", help="skip the instrumented profile runs")
    p.add_argument(
        "--check-tokens",
        type=int,
        default=16,
        help="T=1/2 tokens of the output check against the reference path (greedy: min(new tokens, 64))",
    )
    add_threads_option(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")

    p = sub.add_parser("train", help="training tokens/s and MFU against a measured matmul peak")
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=["tiny", "S"])
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per model and precision")
    p.add_argument("--context", type=int, help="context in backbone steps (default 256)")
    p.add_argument("--batch-tokens", type=int, help="tokens per optimizer step (default 8192 tiny, 2048 otherwise)")
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=["fp32", "bf16"],
        help="precisions to time (default: fp32, plus bf16 where calm.hardware finds it fast)",
    )
    p.add_argument("--peak-size", type=int, default=2048, help="matrix size of the peak-FLOP/s matmuls")
    add_threads_option(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")


ARGUMENTS = {
    "demo": _demo_arguments,
    "report": _report_arguments,
    "sweep": _sweep_arguments,
    "bench": _bench_arguments,
}
