"""The command table and ``calm generate`` through the language-model interface.

``calm --help`` lists every command of ``calm.cli.COMMANDS`` on one line and loads no torch;
``calm generate`` prints what ``generate_text`` returns for the same request (the GPT greedy at
T = 0 and sampling at T = 1.5), and refuses what CALM cannot do with the interface's own message.
Runs the CLI in-process on the tiny checkpoints of ``tiny_lm_checkpoints``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calm.cli
from calm.checkpoint import load_model, resolve_checkpoint
from calm.cli import COMMANDS, build_parser, main
from calm.generate.lm import LanguageModelError, as_language_model, generate_text

PROMPT = "The city"


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_every_command_on_one_line_without_loading_torch() -> None:
    code = (
        "import sys\nfrom calm.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"}
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "no torch"
    for command in COMMANDS:
        (line,) = [x for x in lines if x.split()[:1] == [command.name]]  # exactly one line names it
        assert line.split(None, 1)[1] == command.help and len(line) <= 80
    assert len({c.name for c in COMMANDS}) == len(COMMANDS)


def test_every_command_has_its_arguments_and_function() -> None:
    parser = build_parser()  # every area module registers its commands' arguments
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert list(choices) == [c.name for c in COMMANDS]
    for command in COMMANDS:
        assert callable(getattr(calm.cli, command.function)), command
    with pytest.raises(AttributeError):
        calm.cli.cmd_nothing  # noqa: B018


def test_an_unknown_command_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bogus"])
    assert info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gpt(tiny_lm_checkpoints: dict[str, Path]):
    return load_model(tiny_lm_checkpoints["gpt"])


def test_generate_gpt_at_temperature_0_prints_generate_text(gpt, tiny_lm_checkpoints, capsys) -> None:
    model, tok, _ = gpt
    expected = generate_text(model, tok, [PROMPT], 16, temperature=0)[0]
    argv = ["generate", "--checkpoint", str(tiny_lm_checkpoints["gpt"]), "--prompt", PROMPT, "--max-new-tokens", "16"]
    code, out, err = run([*argv, "--temperature", "0", "--quiet"], capsys)
    assert (code, err) == (0, "") and out == PROMPT + expected + "\n"
    code, out, _ = run([*argv, "--temperature", "0"], capsys)  # streamed: the same text
    assert code == 0 and out == PROMPT + expected + "\n"


def test_generate_gpt_samples_at_temperature_1_5(gpt, tiny_lm_checkpoints, capsys) -> None:
    model, tok, _ = gpt
    greedy = generate_text(model, tok, [PROMPT], 16, temperature=0)[0]
    argv = ["generate", "--checkpoint", str(tiny_lm_checkpoints["gpt"]), "--prompt", PROMPT, "--max-new-tokens", "16"]
    texts = []
    for seed in range(3):
        code, out, _ = run([*argv, "--temperature", "1.5", "--seed", str(seed), "--quiet"], capsys)
        assert code == 0
        texts.append(out[len(PROMPT) : -1])
        assert texts[-1] == generate_text(model, tok, [PROMPT], 16, temperature=1.5, seed=seed)[0]
    assert any(text != greedy for text in texts)  # it samples: a barely trained model is far from its argmax
    code, _, err = run([*argv, "--temperature", "2.5", "--quiet"], capsys)
    assert code == 2 and err.startswith("error: temperature must be in [0, 2] for the GPT")


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_generate_refuses_calm_outside_0_1_with_the_python_message(temperature, tiny_lm_checkpoints, capsys) -> None:
    model, tok, _ = load_model(tiny_lm_checkpoints["calm"])
    with pytest.raises(LanguageModelError) as info:
        generate_text(model, tok, [PROMPT], 8, temperature=temperature)
    argv = ["generate", "--checkpoint", str(tiny_lm_checkpoints["calm"]), "--prompt", PROMPT]
    code, out, err = run([*argv, "--temperature", str(temperature)], capsys)
    assert code == 2 and out == ""  # refused before the prompt is echoed
    assert err.splitlines() == [f"error: {info.value}"]
    assert str(info.value).startswith(f"temperature must be in (0, 1] for CALM, got {temperature}")


def test_generate_says_how_many_calm_steps_fell_back_and_warns_when_most_did(tiny_lm_checkpoints, capsys) -> None:
    """``--num-samples 1 --temperature 0.5`` is plain T = 1 sampling (one candidate never repeats): the
    command says so and names the remedy; with the exact sampler nothing falls back and nothing warns."""
    argv = ["generate", "--checkpoint", str(tiny_lm_checkpoints["calm"]), "--prompt", PROMPT, "--max-new-tokens", "8"]
    argv += ["--no-stop-at-document-end", "--temperature", "0.5", "--seed", "0"]
    code, _, err = run([*argv, "--num-samples", "1"], capsys)
    assert code == 0
    assert err.splitlines() == [
        "sampling: 2 of 2 steps fell back to T = 1 (all candidates differed); effective temperature 1 "
        "(asked 0.5, sampler batch, N = 1)",
        "warning: most steps were not sampled at temperature 0.5; draw more candidates (--num-samples, e.g. 4x "
        "as many) or use the exact sampler (--sampler exact)",
    ]
    code, _, err = run([*argv, "--sampler", "exact"], capsys)
    assert code == 0 and err.splitlines() == [
        "sampling: 0 of 2 steps ran out of draws (most frequent draw returned); effective temperature 0.5 "
        "(asked 0.5, sampler exact)"
    ]
    code, _, err = run(argv[:-4], capsys)  # T = 1: nothing to report
    assert code == 0 and err == ""


def test_generate_from_an_autoencoder_names_the_checkpoint(tiny_lm_checkpoints, capsys) -> None:
    ae = str(tiny_lm_checkpoints["ae"])
    code, _, err = run(["generate", "--checkpoint", ae, "--prompt", PROMPT], capsys)
    assert code == 2 and err.startswith(f"error: {ae} is an autoencoder; pass a CALM or GPT checkpoint")
    model, tok, _ = load_model(ae)
    with pytest.raises(LanguageModelError, match="is an autoencoder"):
        as_language_model(model, tok)


def test_progress_bars_update_rarely_in_a_log_file(tmp_path) -> None:
    """Not a terminal: a bar writes a line every 30 s, not an update every 0.1 s (a run into a log file)."""
    script = (
        "import io, sys, time\n"
        "from calm.cli import progress_for_logs\n"
        "progress_for_logs(io.StringIO())\n"
        "from tqdm.auto import tqdm\n"
        "log = io.StringIO()\n"
        "for _ in tqdm(range(40), file=log): time.sleep(0.02)\n"
        "print(log.getvalue().count(chr(13)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    updates = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert int(updates.stdout) <= 3  # the first and the last; 0.8 s at the default 0.1 s interval gives ~9


def test_flops_of_a_checkpoint_and_the_assumptions_of_a_preset(tiny_lm_checkpoints, capsys) -> None:
    import json

    calm_run = tiny_lm_checkpoints["calm"]
    assert main(["flops", "--checkpoint", str(calm_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    state = json.loads((resolve_checkpoint(calm_run) / "training_state.json").read_text())
    assert (
        result["model"] == "calm"
        and result["train_flops_total"] == result["train_flops_per_token"] * state["tokens_seen"]
    )
    assert "ae_train_flops_total" not in result and "--ae-train-tokens" in result["assumptions"]  # not known to it
    assert main(["flops", "--checkpoint", str(calm_run), "--ae-train-tokens", "1000", "--json"]) == 0
    with_ae = json.loads(capsys.readouterr().out)
    assert with_ae["train_flops_total_with_autoencoder"] > with_ae["train_flops_total"]
    assert main(["flops", "--model", "calm", "--preset", "tiny"]) == 0
    assumptions = capsys.readouterr().out
    assert (
        "assumptions: vocabulary 128,257 (--vocab-size)" in assumptions and "autoencoder preset 'paper'" in assumptions
    )
    assert main(["flops", "--checkpoint", str(calm_run), "--model", "gpt"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["flops", "--checkpoint", str(tiny_lm_checkpoints["ae"])]) == 2
    assert "autoencoder checkpoint" in capsys.readouterr().err


def test_eval_ae_json_takes_a_path_as_eval_does(tiny_lm_checkpoints, tiny_data_dir, tmp_path, capsys) -> None:
    import json

    argv = [
        "eval-ae",
        "--checkpoint",
        str(tiny_lm_checkpoints["ae"]),
        "--data",
        str(tiny_data_dir),
        "--max-chunks",
        "8",
    ]
    out = tmp_path / "ae.json"
    assert main([*argv, "--json", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and json.loads(out.read_text())["tokens"] > 0
    assert main([*argv, "--json"]) == 0  # alone: the JSON object is printed
    assert json.loads(capsys.readouterr().out)["tokens"] == json.loads(out.read_text())["tokens"]


def test_every_command_takes_threads(capsys) -> None:
    def options(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        return sub.choices

    for name, p in options(build_parser()).items():
        for leaf in options(p).values() if name == "bench" else [p]:  # bench's subcommands take it
            assert "--threads" in leaf._option_string_actions, leaf.prog
    code, out, err = run(["flops", "--model", "gpt", "--preset", "tiny", "--threads", "0"], capsys)
    assert code == 2 and err.splitlines() == ["error: --threads must be >= 1, got 0"] and out == ""


@pytest.mark.parametrize("kind", ["calm", "gpt"])
def test_generate_loads_the_weights_in_bf16_when_asked(kind, tiny_lm_checkpoints, capsys) -> None:
    from calm.generate.lm import load_language_model

    lm = load_language_model(tiny_lm_checkpoints[kind], dtype="bf16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    argv = ["generate", "--checkpoint", str(tiny_lm_checkpoints[kind]), "--prompt", PROMPT, "--max-new-tokens", "8"]
    code, out, err = run([*argv, "--dtype", "bf16", "--temperature", "0.5", "--seed", "0", "--quiet"], capsys)
    assert code == 0 and out.startswith(PROMPT), err
