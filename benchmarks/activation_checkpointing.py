"""Peak memory and step time of a training step with and without activation checkpointing.

Each mode runs in a fresh Python process: the model of a preset (GPT or CALM with a random autoencoder),
AdamW, then ``--steps`` training steps (forward, backward, clip, AdamW, as ``calm.train.loop``) on one
random block of ``--tokens`` tokens. Reported per mode: the median step time, the peak resident memory
of the process (``ru_maxrss``) and that peak minus the memory held before the first step (model,
optimizer: the part the activations and gradients add), and the first step's loss (equal in both modes).

    python benchmarks/activation_checkpointing.py --kind gpt --preset S --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from calm.io import to_json

STEP = """
import json, resource, statistics, time
import torch
from calm.config import load_preset
from calm.extensions import build_calm
from calm.models.autoencoder import Autoencoder
from calm.models.gpt import GPT
from calm.train.loop import build_optimizer, set_activation_checkpointing

torch.manual_seed(0)
preset = load_preset({kind!r}, {preset!r}, {{"model.max_seq_len": {context}}})
if {kind!r} == "gpt":
    model, block = GPT(preset.model), torch.randint(0, preset.model.vocab_size, (1, {tokens} + 1))
else:
    ae = Autoencoder(load_preset("autoencoder", "tiny").model)
    model = build_calm(preset.model, ae)
    block = torch.randint(0, preset.model.vocab_size, (1, {tokens}))
model.train()
set_activation_checkpointing(model, {enabled})
params = [p for p in model.parameters() if p.requires_grad]
optimizer = build_optimizer(params, preset.train)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times, losses = [], []
for _ in range({steps}):
    start = time.perf_counter()
    if {kind!r} == "gpt":
        logits = model(block[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), block[:, 1:].flatten())
    else:
        loss, _ = model(block)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
    losses.append(float(loss))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"step_s": round(statistics.median(times), 3), "peak_rss_gib": round(peak / 2**20, 3),
                  "added_gib": round((peak - before) / 2**20, 3), "first_loss": losses[0]}}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kind", choices=["gpt", "calm"], default="gpt")
    parser.add_argument("--preset", default="S")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the training block")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    context = args.tokens if args.kind == "gpt" else args.tokens // 4
    result = {"kind": args.kind, "preset": args.preset, "tokens": args.tokens, "modes": {}}
    for enabled in (False, True):
        code = STEP.format(kind=args.kind, preset=args.preset, tokens=args.tokens, context=context,
                           enabled=enabled, steps=args.steps)  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        mode = "checkpointed" if enabled else "plain"
        result["modes"][mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{mode}: {result['modes'][mode]}", file=sys.stderr)
    plain, ckpt = result["modes"]["plain"], result["modes"]["checkpointed"]
    result["step_time_ratio"] = round(ckpt["step_s"] / plain["step_s"], 2)
    result["added_memory_ratio"] = round(ckpt["added_gib"] / plain["added_gib"], 2) if plain["added_gib"] else None
    print(to_json(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
