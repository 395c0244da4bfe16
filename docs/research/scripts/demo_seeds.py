"""Score the demo's three language models over training seeds, alike, and print the table of cpu-results.md.

Usage: python docs/research/scripts/demo_seeds.py runs/demo runs/demo-seeds

Seed 1 is the demo's own run (``runs/demo/{calm,calm_anchored,gpt}``); seeds 2 and 3 come from
``calm sweep docs/research/sweeps/demo-seeds.yaml --out runs/demo-seeds``. Every checkpoint is scored
as the demo scores it: the first 65,536 tokens of WikiText-103 test (shipped with the package), in
blocks of 256 tokens, so every model has the same 256 tokens of context and the same blocks
(``calm eval --context-tokens 256 --max-tokens 65536``; results cached as ``eval_wikitext_256.json``
in each run). Ratios are to the GPT of the same seed, ± the paired, block-clustered standard error
(``calm.experiments.verdict.brier_ratios``: none where the GPT's Brier-n is not 2 SE above 0).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from calm.eval.brier import evaluate_checkpoint
from calm.experiments.verdict import brier_ratios
from calm.io import read_json, write_json

MODELS = {"calm": "CALM (paper's recipe)", "calm_anchored": "CALM-anchored (ours)", "gpt": "GPT"}
CONTEXT_TOKENS, MAX_TOKENS = 256, 65536


def runs_by_seed(demo: Path, seeds_dir: Path) -> dict[int, dict[str, Path]]:
    """seed -> model -> run directory."""
    out: dict[int, dict[str, Path]] = {1: {name: demo / name for name in MODELS}}
    for run in sorted(seeds_dir.iterdir()):
        name, _, seed = run.name.partition("-seed=")
        if name in MODELS and seed and (run / "DONE.json").exists():
            out.setdefault(int(seed), {})[name] = run
    return out


def score(run: Path) -> dict[str, Any]:
    cached = run / "eval_wikitext_256.json"
    if cached.exists():
        return read_json(cached)
    result = evaluate_checkpoint(
        str(run),
        "wikitext103",
        context_tokens=CONTEXT_TOKENS,
        max_tokens=MAX_TOKENS,
        diagnostic_positions=0,
        progress=False,
    )
    write_json(cached, result)
    return result


def main(demo: str, seeds_dir: str) -> None:
    table = runs_by_seed(Path(demo), Path(seeds_dir))
    scores = {seed: {name: score(run) for name, run in runs.items()} for seed, runs in sorted(table.items())}
    print("| model | seed | Brier-1 (%) | Brier-2 (%) | Brier-3 (%) | Brier-4 (%) | Brier-1 ÷ GPT | Brier-2 ÷ GPT |")
    print("|---|---|---|---|---|---|---|---|")
    spread: dict[str, dict[str, list[float]]] = {name: {} for name in MODELS}
    for name, label in MODELS.items():
        for seed, by_model in scores.items():
            if name not in by_model:
                continue
            e = by_model[name]
            cells = [f"{e[f'brier{n}']:.2f} ± {e[f'brier{n}_se']:.2f}" for n in range(1, 5)]
            ratios = []
            to_gpt = brier_ratios(e, by_model["gpt"], n_max=2) if name != "gpt" and "gpt" in by_model else []
            for r in to_gpt or [{}, {}]:
                ratios.append(f"{r['ratio']:.2f} ± {r['se']:.2f}" if "ratio" in r else "–")
                if "ratio" in r:
                    spread[name].setdefault(f"ratio{r['n']}", []).append(r["ratio"])
            for n in range(1, 5):
                spread[name].setdefault(f"brier{n}", []).append(e[f"brier{n}"])
            print(f"| {label} | {seed} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    print()
    for name, label in MODELS.items():
        parts = []
        for key, values in spread[name].items():
            if values:
                parts.append(f"{key} {min(values):.2f}..{max(values):.2f} (mean {statistics.mean(values):.2f})")
        print(f"{label}, {len(spread[name].get('brier1', []))} seeds: " + "; ".join(parts))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python docs/research/scripts/demo_seeds.py RUNS/DEMO RUNS/DEMO-SEEDS")
    main(sys.argv[1], sys.argv[2])
