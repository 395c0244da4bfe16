"""``calm report`` on one training run and on a sweep folder (the demo's report: ``test_demo.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from calm.cli import main


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / run.name
    shutil.copytree(run, out)
    return out


@pytest.mark.parametrize("kind", ["ae", "calm", "gpt"])
def test_a_training_run_gets_its_own_report(kind, tiny_lm_checkpoints, tmp_path, capsys) -> None:
    run = _copy(tiny_lm_checkpoints[kind], tmp_path)
    assert main(["report", "--run", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'report.md'}"
    text = (run / "report.md").read_text()
    title = {"ae": "autoencoder", "calm": "CALM", "gpt": "GPT (token-level baseline)"}[kind]
    assert text.startswith(f"# Training run report: {title}\n")
    config = json.loads((run / "run_config.json").read_text())
    max_steps = config["train"]["max_steps"]
    assert f"| steps | {max_steps:,} of {max_steps:,} |" in text
    assert "| status | finished |" in text
    assert "## Last validation metrics (step" in text
    assert "analytic" in text  # the FLOPs line says what it counts
    if kind != "ae":
        assert "| brier1 |" in text
    pytest.importorskip("matplotlib")
    assert (run / "curves.png").stat().st_size > 0 and "![training curves](curves.png)" in text


def test_an_unfinished_resumed_run_says_so_and_lists_its_changes(tiny_lm_checkpoints, tmp_path) -> None:
    run = _copy(tiny_lm_checkpoints["gpt"], tmp_path)
    config = json.loads((run / "run_config.json").read_text())
    config["train"]["max_steps"] += 10  # as if stopped early (Ctrl-C, --max-minutes)
    config["train_changes"] = [{"step": 1, "field": "lr", "from": 0.001, "to": 0.003}]
    (run / "run_config.json").write_text(json.dumps(config))
    assert main(["report", "--run", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "| status | not finished: run the `calm train-gpt` command that started it again, with `--resume` |" in text
    assert "| 1 | lr | 0.001 | 0.003 |" in text


def test_a_folder_that_is_no_run_is_refused_naming_the_three_kinds(tmp_path, capsys) -> None:
    assert main(["report", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} is not a run calm can report on")
    assert "run_config.json" in err and "sweep.yaml" in err and "autoencoder/" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_finetune_run_names_its_base_checkpoint_and_examples(tiny_lm_checkpoints, tmp_path) -> None:
    run = _copy(tiny_lm_checkpoints["gpt"], tmp_path)
    config = json.loads((run / "run_config.json").read_text())
    config["finetune"] = {"base_checkpoint": "runs/base", "data": "pairs.jsonl", "lora": {"rank": 8},
                          "counts": {"train_examples": 90, "val_examples": 10}}  # fmt: skip
    (run / "run_config.json").write_text(json.dumps(config))
    assert main(["report", "--run", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "| data | fine-tuned from `runs/base` on `pairs.jsonl` (90 examples, 10 held out, LoRA rank 8) |" in text
