"""Time and peak memory of `calm convert` and `load_model` on a full-size CALM with random weights.

Builds a CALM-M (or L, XL) in the authors' layout (``config.json`` + ``pytorch_model.bin``, the key list
and shapes of ``tests/fixtures/official/full_size_structure.json``; random weights), then runs each
step in a fresh Python process and reports its wall time and peak resident memory (``ru_maxrss``):

- ``convert``: ``calm.interop.convert.convert(folder, out, tokenizer="llama3")``;
- ``load fp32`` / ``load bf16``: ``calm.checkpoint.load_model(out)`` (with ``dtype=torch.bfloat16``
  where the installed calm has that option); ``load fp32 + read every weight`` then reads each
  parameter once, as a first forward pass would (a memory-mapped load reads pages only when used).

    python benchmarks/load_scale.py --size M --work /tmp/calm-load       # this checkout
    python benchmarks/load_scale.py --size M --work /tmp/calm-load --root /path/to/other/checkout

``--root`` runs the steps against another checkout of calm (its ``calm/`` package), to compare before
and after on one machine; the official folder is built once and reused. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from calm.io import to_json

STRUCTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "official" / "full_size_structure.json"

STEP = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
start = time.perf_counter()
{body}
print(json.dumps({{"seconds": round(time.perf_counter() - start, 2),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}}))
"""

CONVERT = """
import shutil
from calm.interop.convert import convert
shutil.rmtree({out!r}, ignore_errors=True)
convert({folder!r}, {out!r}, tokenizer="llama3")
"""

LOAD = """
import inspect
from calm.checkpoint import load_model
kw = {{"dtype": {dtype}}} if "dtype" in inspect.signature(load_model).parameters else {{}}
if {dtype} is not None and not kw:
    raise SystemExit("this checkout's load_model has no dtype option")
model, tok, cfg = load_model({out!r}, **kw)
assert not any(t.is_meta for t in model.state_dict().values())
if {touch}:  # read every weight once, as a first forward pass does (a memory-mapped load is lazy)
    total = sum(float(p.float().sum()) for p in model.parameters())
"""


def build_official(size: str, folder: Path, seed: int = 0) -> Path:
    """``folder`` with config.json and pytorch_model.bin of a random full-size CALM (reused if present)."""
    entry = json.loads(STRUCTURE.read_text())[size]
    weights = folder / "pytorch_model.bin"
    if weights.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in entry["keys"]:
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.randn(shape, generator=gen) * 0.02
    tied = "ae_model.decoder.lm_head_weight"
    if tied in state:  # the authors' .bin shares the autoencoder's output weight with its embedding
        state[tied] = state["ae_model.encoder.embed_tokens.weight"]
    for name in [k for k in state if k.startswith("mlp_generator.")]:  # an alias of the head (format note §2)
        state[name] = state["generative_head." + name.removeprefix("mlp_generator.")]
    torch.save(state, folder / "pytorch_model.bin.tmp")
    (folder / "pytorch_model.bin.tmp").rename(weights)
    (folder / "config.json").write_text(to_json(entry["config"], indent=2))
    return folder


def run_step(root: Path, body: str) -> dict:
    code = STEP.format(root=str(root), body=body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=["M", "L", "XL"], default="M")
    parser.add_argument("--work", type=Path, default=Path("/tmp/calm-load-scale"))
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="calm checkout to time")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each step (the JSON lists them all)")
    args = parser.parse_args()
    start = time.perf_counter()
    folder = build_official(args.size, args.work / f"official-{args.size}")
    out = args.work / f"converted-{args.size}-{args.root.name}"
    size_gib = (folder / "pytorch_model.bin").stat().st_size / 2**30
    print(f"official folder ready ({size_gib:.2f} GiB) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    result = {"size": args.size, "root": str(args.root), "official_bin_gib": round(size_gib, 2), "steps": {}}
    steps = {
        "convert": CONVERT.format(folder=str(folder), out=str(out)),
        "load fp32": LOAD.format(out=str(out), dtype="None", touch=False),
        "load fp32 + read every weight": LOAD.format(out=str(out), dtype="None", touch=True),
        "load bf16": LOAD.format(out=str(out), dtype="torch.bfloat16", touch=False),
    }
    for name, body in steps.items():
        runs = [run_step(args.root, body) for _ in range(args.repeats)]
        result["steps"][name] = runs
        print(f"{name}: {runs}", file=sys.stderr)
    weights = out / "model.safetensors"
    result["converted_gib"] = round(weights.stat().st_size / 2**30, 2) if weights.exists() else None
    result["cpu"] = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(to_json(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
