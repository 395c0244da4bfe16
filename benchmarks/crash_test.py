"""Crash test: SIGKILL a tiny CALM training run at random moments, resume it, compare to an unbroken run.

    PYTHONPATH=. python benchmarks/crash_test.py --kills 20 --seed 0

What it does:

1. builds a small corpus and data directory and trains a tiny autoencoder (``calm train-ae``);
2. trains a tiny CALM run to the end without interruption (``calm train-calm``): the reference;
3. trains the same run again, but SIGKILLs it ``--kills`` times and restarts it with ``--resume``
   each time. The moments cycle through three kinds: a random time during start-up and resume
   (imports, data, loading the checkpoint, cleaning up, truncating the log); a random time of up
   to 1 s into the training steps (steps, evaluation, metric appends, checkpoint writes and
   pruning); and a random few milliseconds after a ``.step_*.tmp-*`` directory appears, i.e.
   inside a checkpoint write. To widen that last window, the child's ``safetensors`` writes are
   slowed by a few milliseconds; nothing else in the code is changed;
4. after every kill, checks that every visible ``step_*`` checkpoint is complete and loadable;
5. at the end, checks that every restart succeeded (no child exited on its own with an error),
   that the logged metrics (the loss, and the grad norm at full float precision) equal the
   reference's record for record, and that the final weights are bit-identical.

Not part of the test suite (it takes a minute or two); the result goes in docs/guides/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calm import checkpoint as ckpt  # noqa: E402 (after the path set-up above)
from calm.data.prepare import prepare  # noqa: E402

# The child: the real CLI, with checkpoint file writes slowed a little so kills can land inside them.
# It seeds torch first because the stages build their models from the global RNG, which torch seeds
# randomly in every new process (see docs/guides/distributed.md#determinism).
CHILD = """
import sys, time
import torch
torch.manual_seed(0)
import calm.checkpoint as c
_save = c.save_file
def slow_save(*args, **kwargs):
    _save(*args, **kwargs)
    time.sleep(float(sys.argv[1]))
c.save_file = slow_save
from calm.cli import main
sys.exit(main(sys.argv[2:]))
"""

MODEL = [
    "model.hidden_size=48",
    "model.intermediate_size=96",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.max_seq_len=16",
    "model.num_samples=4",
    "model.num_target_samples=16",
    "train.block_size=32",
    "train.eval_tokens=64",
    "train.log_every=1",
    "train.keep_checkpoints=2",
    "train.warmup_steps=5",
]
TIMING = ("elapsed_s", "tokens_per_s")


def make_corpus(path: Path, num_docs: int = 300, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "the a river bird poet city wrote crossed sang old quiet valley bridge people known in of".split()
    with open(path, "w") as f:
        for i in range(num_docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randrange(20, 80)))
            f.write(json.dumps({"text": f" = Document {i} = \n {text} .\n"}, allow_nan=False) + "\n")


def cli(args: list[str], delay: float, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, str(delay), *args], env=env, stdout=f, stderr=subprocess.STDOUT
        )


def calm_args(data: Path, ae: Path, out: Path, steps: int, save_every: int) -> list[str]:
    args = [
        "train-calm",
        "--data",
        str(data),
        "--autoencoder",
        str(ae),
        "--out",
        str(out),
        "--resume",
        "--max-steps",
        str(steps),
        "--save-every",
        str(save_every),
        "--eval-every",
        str(save_every * 4),
        "--batch-tokens",
        "128",
        "--precision",
        "fp32",
        "--seed",
        "7",
        "--no-progress",
    ]
    for item in MODEL:
        args += ["--set", item]
    return args


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if k not in TIMING})
    return out


def leftovers_of(run: Path) -> list[str]:
    """Hidden directories of interrupted writes (``.step_N.tmp-*``) in ``RUN/checkpoints``."""
    root = run / "checkpoints"
    return sorted(p.name for p in root.glob(".*")) if root.is_dir() else []


def check_visible_checkpoints(run: Path) -> int:
    found = ckpt.list_checkpoints(run)
    for path in found:
        ckpt.read_config(path)  # every file present with its recorded size
        ckpt.load_training_state(path)
        ckpt.load_weights(path)
    return len(found)


def prepare_work(work: Path) -> None:
    """A fresh ``work`` folder with the corpus, its prepared data and a trained tiny autoencoder."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    make_corpus(work / "corpus.jsonl")
    prepare(
        work / "data",
        [str(work / "corpus.jsonl")],
        tokenizer="train",
        vocab_size=320,
        val_fraction=0.05,
        progress=False,
    )
    ae_args = [
        "train-ae",
        "--data",
        str(work / "data"),
        "--out",
        str(work / "ae"),
        "--max-steps",
        "30",
        "--batch-tokens",
        "256",
        "--precision",
        "fp32",
        "--no-progress",
        "--set",
        "model.hidden_size=32",
        "--set",
        "model.intermediate_size=64",
        "--set",
        "model.latent_size=8",
    ]
    assert cli(ae_args, 0.0, work / "ae.log").wait() == 0, (work / "ae.log").read_text()


def unbroken_run(work: Path, args: argparse.Namespace) -> float:
    """Train the reference run to the end; return its start-up time (seconds to the first logged step)."""
    unbroken_args = calm_args(work / "data", work / "ae", work / "unbroken", args.steps, args.save_every)
    t0 = time.perf_counter()
    child = cli(unbroken_args, args.write_delay, work / "unbroken.log")
    while child.poll() is None and not (work / "unbroken" / "metrics.jsonl").exists():
        time.sleep(0.01)
    startup = time.perf_counter() - t0
    assert child.wait() == 0, (work / "unbroken.log").read_text()
    print(f"unbroken run: {args.steps} steps in {time.perf_counter() - t0:.1f}s ({startup:.1f}s to the first step)")
    return startup


def wait_for_moment(
    child: subprocess.Popen,
    moment: str,
    rng: random.Random,
    startup: float,
    broken: Path,
    started: float,
    before: set[str],
    write_delay: float,
) -> None:
    """Return at a random moment of the kind ``moment`` (or when the child has exited)."""
    metrics = broken / "metrics.jsonl"
    deadline = time.perf_counter() + (rng.uniform(0.1, startup) if moment == "start-up" else 120.0)
    while child.poll() is None and time.perf_counter() < deadline:
        if moment == "training" and metrics.exists() and metrics.stat().st_mtime > started:
            time.sleep(rng.uniform(0.0, 1.0))
            break
        if moment == "write" and any(".tmp-" in name and name not in before for name in leftovers_of(broken)):
            time.sleep(rng.uniform(0.0, 2 * write_delay))
            break
        time.sleep(0.002)


def broken_run(
    work: Path, args: argparse.Namespace, rng: random.Random, startup: float
) -> tuple[int, int, int, dict[str, int]] | None:
    """Train the same run again, SIGKILLed ``args.kills`` times and restarted with --resume each time;
    returns (kills, starts, resumes, where the kills landed), or None if a restart failed."""
    broken = work / "broken"
    metrics = broken / "metrics.jsonl"
    broken_args = calm_args(work / "data", work / "ae", broken, args.steps, args.save_every)
    kills, attempts, resumes, landed = 0, 0, 0, {"start-up": 0, "training": 0, "checkpoint write": 0}
    while True:
        attempts += 1
        log = work / f"attempt_{attempts:02d}.log"
        before = set(leftovers_of(broken))
        started = metrics.stat().st_mtime if metrics.exists() else 0.0
        child = cli(broken_args, args.write_delay, log)
        if kills < args.kills:
            # cycle through three kinds of moment: during start-up / resume, a random time into the
            # training steps, and a random few milliseconds into a checkpoint write
            moment = ("start-up", "training", "write")[kills % 3]
            wait_for_moment(child, moment, rng, startup, broken, started, before, args.write_delay)
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                child.wait()
                kills += 1
                leftovers = leftovers_of(broken)
                in_write = any(".tmp-" in name and name not in before for name in leftovers)
                landed["checkpoint write" if in_write else ("start-up" if moment == "start-up" else "training")] += 1
                visible = check_visible_checkpoints(broken)
                newest = ckpt.list_checkpoints(broken)
                print(
                    f"kill {kills:2d} ({moment:8s}, {'in a checkpoint write' if in_write else 'elsewhere'}): "
                    f"{visible} complete checkpoint(s), newest {newest[-1].name if newest else '-'}, "
                    f"leftovers {leftovers}"
                )
        child.wait()
        text = log.read_text()
        resumes += "resuming calm from" in text
        if child.returncode == -signal.SIGKILL:
            continue
        if child.returncode != 0:
            print(f"FAIL: attempt {attempts} exited with {child.returncode}:\n{text[-2000:]}")
            return None
        return kills, attempts, resumes, landed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--save-every", type=int, default=6)
    parser.add_argument("--write-delay", type=float, default=0.03, help="seconds added after each file write")
    parser.add_argument("--work", default="runs/crash_test")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    work = Path(args.work)
    prepare_work(work)
    startup = unbroken_run(work, args)
    outcome = broken_run(work, args, rng, startup)
    if outcome is None:
        return 1
    kills, attempts, resumes, landed = outcome
    same_log = records(work / "broken") == records(work / "unbroken")
    a, b = ckpt.load_weights(work / "unbroken"), ckpt.load_weights(work / "broken")
    same_weights = set(a) == set(b) and all(bool((a[k] == b[k]).all()) for k in a)
    where = ", ".join(f"{n} in {k}" for k, n in landed.items())
    print(f"{kills} SIGKILLs ({where}); {attempts} starts, {resumes} of them reached a resume; every restart succeeded")
    print(f"metrics.jsonl equal to the unbroken run's (loss, grad_norm, lr, eval): {same_log}")
    print(f"final weights bit-identical: {same_weights}")
    return 0 if same_log and same_weights else 1


if __name__ == "__main__":
    sys.exit(main())
