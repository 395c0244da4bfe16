"""The CUDA check: one script that exercises on a GPU what the CPU test suite cannot, and prints one JSON.

On a CUDA machine (the default ``--device cuda``):

1. ``environment``: torch, the GPU, and what ``precision: auto`` resolves to there (``calm.hardware``).
2. ``bench_train``: ``calm bench train --sizes S`` (tokens/s and MFU of CALM and the GPT against a
   measured bf16/fp32 matmul peak).
3. ``data``: ``calm prepare`` on the packaged WikiText-103 test set (no network needed).
4. ``train``: an autoencoder, then CALM and the GPT of ``--size`` for ``--steps`` steps each, in this
   process (bf16 autocast, SDPA attention): tokens/s from their metrics.jsonl, the peak GPU memory
   of each run (``torch.cuda.max_memory_allocated``), the last losses.
5. ``torchrun``: the GPT for a few steps under ``torchrun --nproc_per_node 1`` with ``--strategy ddp``
   and ``--strategy fsdp`` (NCCL).
6. ``generate``: ``calm generate`` from the CALM at T = 1 and T = 1/2 (with the sampling report)
   and from the GPT, timed.
7. ``brierlm``: ``calm eval`` of both models on WikiText-103 (``--max-tokens``).

Every step records its command, exit status and seconds; a failing step does not stop the others.
``--device cpu --size tiny --steps 4`` runs the same script on a CPU in a few minutes (the
project checks it there; the figures that matter come from a GPU).

    python benchmarks/gpu_check.py --out /tmp/gpu-check                      # CUDA, S size, 300 steps
    python benchmarks/gpu_check.py --out /tmp/gpu-check --device cpu --size tiny --steps 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from calm.io import to_json

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT / "calm" / "data" / "wikitext103" / "test.jsonl.gz"


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; its exit status, seconds and the last lines of its output."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
    return {
        "command": " ".join(cmd),
        "rc": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "stdout_tail": done.stdout.strip().splitlines()[-6:],
        "stderr_tail": done.stderr.strip().splitlines()[-6:],
    }


def calm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "calm", *args]


def environment(device: str) -> dict[str, Any]:
    from calm.hardware import resolve_precision

    info: dict[str, Any] = {"torch": torch.__version__, "device": device, "precision_auto": None}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: pass --device cpu to check the script on a CPU")
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), capability=[props.major, props.minor]
        )
    info["precision_auto"] = resolve_precision("auto", device)
    return info


def train_runs(out: Path, data: Path, size: str, steps: int, device: str) -> dict[str, Any]:
    """The autoencoder, CALM and GPT trained in this process; per run: tokens/s, peak memory, last loss."""
    from calm.config import load_preset
    from calm.train.loop import run_training
    from calm.train.stages import AutoencoderStage, CALMStage, GPTStage

    cuda = device == "cuda"
    results: dict[str, Any] = {}
    every = {"train.max_steps": steps, "train.eval_every": steps, "train.save_every": steps, "train.log_every": 10}
    plans = [
        ("autoencoder", "tiny", lambda p: AutoencoderStage(data, p.model, p.train)),
        ("calm", size, lambda p: CALMStage(data, p.model, p.train, out / "autoencoder")),
        ("gpt", size, lambda p: GPTStage(data, p.model, p.train)),
    ]
    for kind, preset_name, make in plans:
        extra = {"train.batch_tokens": 16384} if kind != "autoencoder" and size != "tiny" else {}
        preset = load_preset(kind, preset_name, {**every, **extra})
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            run_training(make(preset), preset.train, out / kind, overwrite=True, progress=False,
                         device=torch.device(device))  # fmt: skip
        except Exception as e:  # recorded; the other steps still run
            results[kind] = {"error": f"{type(e).__name__}: {e}"}
            continue
        records = [json.loads(line) for line in (out / kind / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r.get("split") == "train"]
        results[kind] = {
            "preset": preset_name,
            "steps": steps,
            "seconds": round(time.perf_counter() - start, 1),
            "tokens_per_s_median": sorted(r["tokens_per_s"] for r in train)[len(train) // 2] if train else None,
            "last_loss": train[-1].get("loss") if train else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "precision": json.loads((out / kind / "run_config.json").read_text())["train"].get("precision"),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/calm-gpu-check"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", default="S", help="preset of CALM and the GPT (tiny for a CPU check)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each model")
    parser.add_argument("--max-tokens", type=int, default=65536, help="WikiText-103 tokens BrierLM scores")
    args = parser.parse_args()
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    report: dict[str, Any] = {"environment": environment(args.device)}
    print(f"environment: {report['environment']}", file=sys.stderr)
    bench_sizes = ["S"] if args.device == "cuda" else ["tiny"]
    report["bench_train"] = run(calm_cmd("bench", "train", "--sizes", *bench_sizes, "--device", args.device,
                                         "--steps", "10" if args.device == "cuda" else "2", "--json"))  # fmt: skip
    data = out / "data"
    report["data"] = run(calm_cmd("prepare", "--corpus", str(WIKITEXT), "--vocab-size", "4096", "--out", str(data),
                                  "--no-progress"))  # fmt: skip
    print(f"data: rc {report['data']['rc']}", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # the loop's lines; stdout carries only the JSON
        report["train"] = train_runs(out, data, args.size, args.steps, args.device)
    print(f"train: {report['train']}", file=sys.stderr)
    report["torchrun"] = {}
    for strategy in ("ddp", "fsdp"):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        cmd = [*torchrun, "-m", "calm", "train-gpt", "--data", str(data), "--out", str(out / f"gpt-{strategy}"),
               "--preset", args.size, "--max-steps", "20", "--strategy", strategy, "--no-progress",
               "--eval-every", "20"]  # fmt: skip
        report["torchrun"][strategy] = run(cmd)
    report["generate"] = {}
    prompt = "The history of the city"
    for name, model, temperature in (("calm T=1", "calm", "1"), ("calm T=0.5", "calm", "0.5"), ("gpt T=1", "gpt", "1")):
        report["generate"][name] = run(calm_cmd("generate", "--checkpoint", str(out / model), "--prompt", prompt,
                                                "--max-new-tokens", "128", "--temperature", temperature, "--seed", "0",
                                                "--quiet", "--no-stop-at-document-end"))  # fmt: skip
    report["brierlm"] = {
        model: run(
            calm_cmd(
                "eval",
                "--checkpoint",
                str(out / model),
                "--data",
                "wikitext103",
                "--max-tokens",
                str(args.max_tokens),
                "--json",
                str(out / f"eval_{model}.json"),
                "--no-progress",
            )
        )  # fmt: skip
        for model in ("calm", "gpt")
    }
    for model in ("calm", "gpt"):
        path = out / f"eval_{model}.json"
        if path.exists():
            result = json.loads(path.read_text())
            report["brierlm"][model]["scores"] = {
                k: result.get(k) for k in ("brierlm", "brier1", "brier2", "positions")
            }
    failed = [f"{section}/{name}" for section in ("torchrun", "generate", "brierlm")
              for name, step in report[section].items() if step.get("rc")]  # fmt: skip
    failed += [f"{name}" for name in ("bench_train", "data") if report[name]["rc"]]
    failed += [f"train/{k}" for k, v in report["train"].items() if "error" in v]
    report["failed"] = failed
    print(to_json(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
