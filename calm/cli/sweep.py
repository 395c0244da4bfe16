"""``calm sweep``: its command line (the runner: ``calm.experiments.sweep``; studies: ``experiments.studies``)."""

from __future__ import annotations

import argparse
from typing import Any

from calm.config import ConfigError


def cmd_sweep(args: argparse.Namespace) -> int:
    from calm.experiments.sweep import run_sweep, spec_from_cli

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
    from calm.experiments.studies import run_study

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


def add_sweep_parser(sub: Any) -> None:
    """Register ``calm sweep``."""
    p = sub.add_parser("sweep", help="train a grid of overrides at a fixed FLOPs/token budget; table + plot")
    p.add_argument(
        "spec", nargs="?", help="YAML sweep spec (format: `calm/experiments/sweep.py` docstring, README); or --study"
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
        "latent-size, chunk-size (README 'Ablation studies'); prepares the default data without --data",
    )
    p.add_argument(
        "--scale",
        help="with --study: the CALM preset (S, M, L, XL) at the paper's ablation budget "
        "(default: tiny, sized for one CPU thread)",
    )
    p.add_argument("--seeds", type=int, help="with --study: repeat every CALM run with seeds 1..N (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and their steps; train nothing")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sweep)
