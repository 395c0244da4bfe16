"""Bad input across the CLI: each case prints one clear ``error:`` line, exits non-zero, changes no file.

The CLI runs in-process (``calm.cli.main``). Tiny runs of the three stages are trained once for the
module; each case then works on them (or on damaged copies) and the test compares a hash of every
file under the run, checkpoint and data directories before and after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import factories
import pytest
import torch

from calm.cli import main

FAST = [
    "--precision",
    "fp32",
    "--max-steps",
    "2",
    "--no-progress",
    "--set",
    "train.eval_tokens=64",
    "--set",
    "train.log_every=1",
]
# the tiny models of factories (TINY_AE, TINY_CALM, TINY_GPT), 64 tokens a step
AE = ["--batch-tokens", "64", *factories.set_args(factories.dotted("model", factories.TINY_AE))]
CALM = [*factories.set_args(factories.dotted("model", factories.TINY_CALM)), "--batch-tokens", "64"]
CALM += ["--set", "train.block_size=32"]
GPT = [*factories.set_args(factories.dotted("model", factories.TINY_GPT)), "--batch-tokens", "64"]
GPT += ["--set", "train.block_size=16"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


@pytest.fixture(scope="module")
def runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny AE, CALM and GPT runs, another data set (another tokenizer), and damaged copies."""
    from calm.data.prepare import prepare

    root = tmp_path_factory.mktemp("bad_inputs")
    data = str(data_dir)
    paths = {"root": root, "data": data_dir}
    for kind in ("ae", "calm", "gpt"):
        paths[kind] = root / kind
    assert main(["train-ae", "--data", data, "--out", str(paths["ae"]), *AE, *FAST]) == 0
    assert (
        main(
            [
                "train-calm",
                "--data",
                data,
                "--autoencoder",
                str(paths["ae"]),
                "--out",
                str(paths["calm"]),
                *CALM,
                *FAST,
            ]
        )
        == 0
    )
    assert main(["train-gpt", "--data", data, "--out", str(paths["gpt"]), *GPT, *FAST]) == 0

    text = root / "other.txt"
    text.write_text("entirely different words for a different tokenizer, again and again. " * 300)
    paths["other_data"] = root / "other_data"
    prepare(paths["other_data"], [str(text)], tokenizer="train", vocab_size=300, val_fraction=0.0, progress=False)

    def damaged(name: str, source: Path, damage: Callable[[Path], None]) -> None:
        paths[name] = root / name
        shutil.copytree(source, paths[name])
        damage(paths[name] / "checkpoints" / "step_00000002")

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def garble_header(path: Path) -> None:  # same size, nonsense header length
        data = path.read_bytes()
        path.write_bytes(b"\xff" * 8 + data[8:])

    damaged("ae_truncated", paths["ae"], lambda c: truncate(c / "model.safetensors"))
    damaged("calm_bad_json", paths["calm"], lambda c: (c / "config.json").write_text("{ not json"))
    damaged("calm_garbled", paths["calm"], lambda c: garble_header(c / "model.safetensors"))
    damaged("calm_state_truncated", paths["calm"], lambda c: truncate(c / "training_state.safetensors"))

    def other_tokenizer(c: Path) -> None:
        (c / "tokenizer.json").write_text((paths["other_data"] / "tokenizer.json").read_text())

    damaged("gpt_other_tokenizer", paths["gpt"], other_tokenizer)
    return paths


def cases(p: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """(name, argv, a regex the error message must match)."""
    data, ae, calm, gpt = str(p["data"]), str(p["ae"]), str(p["calm"]), str(p["gpt"])
    new = str(p["root"] / "new_run")  # never created: every case fails before writing
    long_prompt = "the river crossed the old bridge " * 40
    return [
        (
            "missing data directory",
            ["train-ae", "--data", str(p["root"] / "nope"), "--out", new, *AE, *FAST],
            "data directory .* does not exist; run `calm prepare",
        ),
        (
            "heads do not divide the width",
            ["train-gpt", "--data", data, "--out", new, *GPT, "--set", "model.num_heads=3", *FAST],
            "hidden_size=32 is not divisible by num_heads=3",
        ),
        (
            "chunk size 0",
            ["train-ae", "--data", data, "--out", new, *AE, "--set", "model.chunk_size=0", *FAST],
            "chunk_size must be >= 1",
        ),
        (
            "N < 2 head samples for the energy loss",
            [
                "train-calm",
                "--data",
                data,
                "--autoencoder",
                ae,
                "--out",
                new,
                *CALM,
                "--set",
                "model.num_samples=1",
                *FAST,
            ],
            "num_samples=1: the energy score needs at least 2",
        ),
        (
            "unknown config key",
            ["train-gpt", "--data", data, "--out", new, *GPT, "--set", "model.widht=3", *FAST],
            "unknown GPTConfig keys \\['widht'\\]",
        ),
        (
            "zero steps",
            ["train-gpt", "--data", data, "--out", new, *GPT, *FAST, "--max-steps", "0"],
            "max_steps must be >= 1",
        ),
        (
            "batch not a multiple of the block",
            ["train-gpt", "--data", data, "--out", new, *GPT, *FAST, "--batch-tokens", "40"],
            "not a multiple of the 16 tokens per training item",
        ),
        (
            "existing run without --resume/--overwrite",
            ["train-gpt", "--data", data, "--out", gpt, *GPT, *FAST],
            "already exists .* pass --resume .* or --overwrite",
        ),
        (
            "resume a run of another stage",
            ["train-gpt", "--data", data, "--out", calm, *GPT, *FAST, "--resume"],
            "is a calm checkpoint but this is a gpt run",
        ),
        (
            "resume with another model config",
            [
                "train-gpt",
                "--data",
                data,
                "--out",
                gpt,
                *GPT,
                *FAST,
                "--resume",
                "--set",
                "model.intermediate_size=96",
            ],
            "model config differs .* \\['intermediate_size'\\]",
        ),
        (
            "resume from a truncated training state",
            [
                "train-calm",
                "--data",
                data,
                "--autoencoder",
                ae,
                "--out",
                str(p["calm_state_truncated"]),
                *CALM,
                *FAST,
                "--resume",
            ],
            "cannot resume: .*truncated",
        ),
        (
            "truncated autoencoder weights",
            [
                "train-calm",
                "--data",
                data,
                "--autoencoder",
                str(p["ae_truncated"]),
                "--out",
                new,
                *CALM,
                *FAST,
            ],
            "model.safetensors has \\d+ bytes but the checkpoint recorded",
        ),
        (
            "autoencoder is a GPT checkpoint",
            ["train-calm", "--data", data, "--autoencoder", gpt, "--out", new, *CALM, *FAST],
            "is a gpt checkpoint but an autoencoder checkpoint is needed",
        ),
        (
            "autoencoder of another tokenizer",
            ["train-calm", "--data", str(p["other_data"]), "--autoencoder", ae, "--out", new, *CALM, *FAST],
            "different tokenizer than the data",
        ),
        (
            "checkpoint config is not JSON",
            ["generate", "--checkpoint", str(p["calm_bad_json"]), "--prompt", "The", "--quiet"],
            "not valid JSON .*; the checkpoint is corrupt",
        ),
        (
            "garbled weights header",
            ["generate", "--checkpoint", str(p["calm_garbled"]), "--prompt", "The", "--quiet"],
            "model.safetensors is corrupt or truncated",
        ),
        (
            "tokenizer.json replaced",
            ["generate", "--checkpoint", str(p["gpt_other_tokenizer"]), "--prompt", "The", "--quiet"],
            "tokenizer.json has \\d+ bytes but the checkpoint recorded",
        ),
        (
            "generate from an autoencoder",
            ["generate", "--checkpoint", ae, "--prompt", "The", "--quiet"],
            "is an autoencoder; pass a CALM",
        ),
        (
            "temperature 0",
            ["generate", "--checkpoint", calm, "--prompt", "The", "--temperature", "0", "--quiet"],
            "temperature must be in \\(0, 1\\]",
        ),
        (
            "temperature above 1",
            ["generate", "--checkpoint", calm, "--prompt", "The", "--temperature", "1.5", "--quiet"],
            "temperature must be in \\(0, 1\\]",
        ),
        (
            "N < 1 candidates",
            [
                "generate",
                "--checkpoint",
                calm,
                "--prompt",
                "The",
                "--temperature",
                "0.5",
                "--num-samples",
                "0",
                "--quiet",
            ],
            "num_samples must be >= 1",
        ),
        (
            "CALM prompt longer than the context",
            ["generate", "--checkpoint", calm, "--prompt", long_prompt, "--quiet"],
            "exceeds the context of 16 steps",
        ),
        (
            "GPT prompt longer than the context",
            ["generate", "--checkpoint", gpt, "--prompt", long_prompt, "--quiet"],
            "exceeds the context of 32",
        ),
        (
            "evaluation context longer than the model's, in steps",
            ["eval", "--checkpoint", calm, "--data", data, "--context-steps", "1000"],
            r"--context-steps 1,000 is more than the model attends over 16 steps of 4 token\(s\); "
            "pass --context-steps 16 or less",
        ),
        (
            "evaluation context longer than the model's, in tokens",
            ["eval", "--checkpoint", gpt, "--data", data, "--context-tokens", "1000"],
            r"--context-tokens 1,000 is more than the model attends over 32 steps of 1 token\(s\); "
            "pass --context-tokens 33 or less",
        ),
        (
            "evaluate a missing checkpoint",
            ["eval-ae", "--checkpoint", str(p["root"] / "nope"), "--data", data],
            "does not exist",
        ),
    ]


CASE_NAMES = [
    c[0]
    for c in cases(
        {
            k: Path(k)
            for k in (
                "data",
                "ae",
                "calm",
                "gpt",
                "root",
                "other_data",
                "ae_truncated",
                "calm_bad_json",
                "calm_garbled",
                "calm_state_truncated",
                "gpt_other_tokenizer",
            )
        }
    )
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_refused_cleanly(name: str, runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    _, argv, message = next(c for c in cases(runs) if c[0] == name)
    before = snapshot(runs["root"], runs["data"])
    code, err = run_cli(argv, capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert re.search(message, lines[-1]), (message, err)
    assert snapshot(runs["root"], runs["data"]) == before, "files changed"


def test_each_bad_input_gets_its_own_message(runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """The cases name at least 15 different problems, and no two of them get the same error line: a
    generic message ("invalid input") for several problems fails here even where each case's pattern
    matches it."""
    assert len(CASE_NAMES) >= 15 and len(set(CASE_NAMES)) == len(CASE_NAMES)
    errors = {}
    for name, argv, _ in cases(runs):
        _, err = run_cli(argv, capsys)
        errors[name] = [line for line in err.splitlines() if line.strip()][-1]
    repeated = {e: [n for n in errors if errors[n] == e] for e in errors.values() if list(errors.values()).count(e) > 1}
    assert not repeated, repeated


def test_the_tokenizer_hint_is_a_command_that_works(runs: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """The autoencoder-of-another-tokenizer refusal names a `calm prepare` command; it runs, and the data
    it makes has the autoencoder's tokenizer."""
    from calm.data.tokenizer import load_tokenizer

    argv = ["train-calm", "--data", str(runs["other_data"]), "--autoencoder", str(runs["ae"])]
    code, err = run_cli([*argv, "--out", str(runs["root"] / "never"), *CALM, *FAST], capsys)
    assert code == 2
    hint = re.search(r"`(calm prepare [^`]+)`, then --data (\S+)\)", err)
    assert hint, err
    assert main([*hint.group(1).split()[1:], "--no-progress"]) == 0
    capsys.readouterr()
    assert load_tokenizer(hint.group(2)).sha256 == load_tokenizer(runs["ae"]).sha256  # a run directory works too


def test_disk_full_before_any_write_changes_nothing(runs, capsys, monkeypatch, tmp_path) -> None:
    """ENOSPC on the first write of a resumed run: the run directory is left exactly as it was."""
    run = tmp_path / "gpt"
    shutil.copytree(runs["gpt"], run)
    before = snapshot(run)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, err = run_cli(
        [
            "train-gpt",
            "--data",
            str(runs["data"]),
            "--out",
            str(run),
            *GPT,
            *FAST,
            "--resume",
            "--max-steps",
            "4",
        ],
        capsys,
    )
    assert code == 2
    assert "No space left on device" in err and "could not write" in err
    assert snapshot(run) == before


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(runs, capsys, monkeypatch, tmp_path) -> None:
    """ENOSPC while writing step 4's checkpoint: step 2's stays intact, no half-written directory."""
    import calm.checkpoint as ckpt

    run = tmp_path / "gpt"
    shutil.copytree(runs["gpt"], run)
    before = snapshot(run / "checkpoints")

    def full(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", full)
    code, err = run_cli(
        [
            "train-gpt",
            "--data",
            str(runs["data"]),
            "--out",
            str(run),
            *GPT,
            *FAST,
            "--resume",
            "--max-steps",
            "4",
        ],
        capsys,
    )
    assert code == 2
    assert "could not write checkpoint" in err and "step_00000002 is intact" in err, err
    assert "No space left on device" in err
    assert snapshot(run / "checkpoints") == before
    monkeypatch.undo()
    # and the run resumes from the intact checkpoint once there is room again
    code, _ = run_cli(
        [
            "train-gpt",
            "--data",
            str(runs["data"]),
            "--out",
            str(run),
            *GPT,
            *FAST,
            "--resume",
            "--max-steps",
            "4",
        ],
        capsys,
    )
    assert code == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 1  # the failed attempt's log lines were dropped


# ----------------------------------------------------------------------------- non-finite guards


def _gpt_stage(data_dir: Path, max_steps: int = 6, skip: bool = False):
    """The tiny GPT, saved every 2 steps and never evaluated."""
    from calm.train.stages import GPTStage

    steps = dict(block_size=16, max_steps=max_steps, eval_every=100, eval_tokens=32)
    cfg = factories.train_config(lr=1e-3, skip_nonfinite=skip, **steps)
    return GPTStage(data_dir, factories.gpt_config(), cfg)


def _poison(stage, at_call: int, where: str) -> None:
    """Make the loss (or only its gradient) non-finite on the ``at_call``-th micro-batch."""
    real, calls = stage.loss, {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, metrics = real(model, batch)
        if calls["n"] == at_call:
            if where == "loss":
                loss = loss * float("nan")
                metrics = {**metrics, "loss": loss.detach()}
            else:
                loss.register_hook(lambda g: g * float("inf"))
        return loss, metrics

    stage.loss = loss_fn


def test_nonfinite_gradient_stops_naming_step_and_stage(data_dir: Path, tmp_path: Path) -> None:
    from calm import checkpoint as ckpt
    from calm.train.loop import NonFiniteError, run_training

    stage = _gpt_stage(data_dir)
    _poison(stage, at_call=5, where="gradient")
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 5 of stage gpt.*step_00000004"):
        run_training(stage, stage.train_config, tmp_path / "run", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000004"]


def test_skip_nonfinite_skips_the_bad_step_and_finishes(data_dir: Path, tmp_path: Path) -> None:
    from calm import checkpoint as ckpt
    from calm.train.loop import run_training

    stage = _gpt_stage(data_dir, skip=True)
    _poison(stage, at_call=3, where="loss")
    run_training(stage, stage.train_config, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "split": "train", "skipped_nonfinite": True} in records
    weights = ckpt.load_weights(tmp_path / "run")
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == "step_00000006"
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
