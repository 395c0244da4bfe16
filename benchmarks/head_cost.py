"""Measured sampling time per head against the FLOPs accounting's passes per sample (Table 1, Figs. 8-9).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/head_cost.py --hidden 1024 --rows 256 --repeats 7

Builds the energy, flow and diffusion heads at one width (default the CALM-M head: d = 1024,
4 blocks, l = 128), times ``head.sample(h, 1)`` for ``--rows`` conditioning vectors in one process
with the heads interleaved in every repetition, and prints each head's median time relative to the
energy head next to ``calm.models.flops``' ratio of head FLOPs per sample. Sampling steps are the
defaults (flow 4 midpoint steps, diffusion 100) unless ``--flow-steps`` / ``--diffusion-steps``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from calm.config import CALMConfig
from calm.models.flops import head_params, head_passes_per_sample
from calm.models.heads import build_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--flow-steps", type=int, default=4)
    parser.add_argument("--diffusion-steps", type=int, default=100)
    args = parser.parse_args()
    configs = {
        head: CALMConfig(
            hidden_size=args.hidden,
            num_heads=16,
            num_head_blocks=args.blocks,
            latent_size=args.latent,
            head=head,
            flow_steps=args.flow_steps,
            diffusion_steps=args.diffusion_steps,
        )
        for head in ("energy", "flow", "diffusion")
    }
    heads = {name: build_head(cfg).eval() for name, cfg in configs.items()}
    h = torch.randn(args.rows, args.hidden)
    times: dict[str, list[float]] = {name: [] for name in heads}
    with torch.no_grad():
        for head in heads.values():  # warm-up
            head.sample(h, 1)
        for _ in range(args.repeats):
            for name, head in heads.items():
                start = time.perf_counter()
                head.sample(h, 1, torch.Generator().manual_seed(0))
                times[name].append(time.perf_counter() - start)
    energy_time = statistics.median(times["energy"])
    energy_flops = head_passes_per_sample(configs["energy"]) * 2 * head_params(configs["energy"])[1]
    print(f"{'head':<10} {'passes':>6} {'median ms':>10} {'time / energy':>14} {'FLOPs / energy':>15}")
    for name, cfg in configs.items():
        flops = head_passes_per_sample(cfg) * 2 * head_params(cfg)[1]
        median = statistics.median(times[name])
        print(
            f"{name:<10} {head_passes_per_sample(cfg):>6} {median * 1e3:>10.1f} "
            f"{median / energy_time:>14.2f} {flops / energy_flops:>15.2f}"
        )


if __name__ == "__main__":
    main()
