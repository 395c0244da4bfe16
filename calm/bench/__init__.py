"""Speed benchmarks of CALM against the token-level Transformer with the same backbone (CALM-SPEC §7, §8.1).

- ``calm bench generate`` (:mod:`calm.bench.generate`): decoding tokens/s, greedy and at T = 1/2,
  with a per-step profile.
- ``calm bench train`` (:mod:`calm.bench.train`): training tokens/s and MFU.

Shared model construction and timing helpers live in :mod:`calm.bench.common`. Figures and the
JSON layout: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse

from calm.bench.common import SIZES, build_pair
from calm.bench.generate import bench_generate, cmd_bench_generate, timed_calls
from calm.bench.train import bench_train, cmd_bench_train

__all__ = ["SIZES", "add_bench_parser", "bench_generate", "bench_train", "build_pair", "timed_calls"]


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``calm bench generate`` and ``calm bench train``."""
    bench = sub.add_parser("bench", help="speed benchmarks: CALM vs the GPT baseline with the same backbone")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)

    p = bench_sub.add_parser("generate", help="decoding tokens/s, greedy and T=1/2, with a per-step profile")
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
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    p.set_defaults(func=cmd_bench_generate)

    p = bench_sub.add_parser("train", help="training tokens/s and MFU against a measured matmul peak")
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
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    p.set_defaults(func=cmd_bench_train)
