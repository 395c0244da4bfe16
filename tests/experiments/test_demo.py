"""The main job (``calm demo``) end to end on tiny models: equal-FLOPs step counts, report, reuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import factories
import pytest

from calm.experiments.demo import run_demo, steps_for_budget

_AE = {**factories.dotted("model", factories.TINY_AE), "train.max_steps": 3, "train.batch_tokens": 128}
_LM = {  # one layer of the tiny width
    "model.hidden_size": 32,
    "model.intermediate_size": 64,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.max_seq_len": 72,
    "train.batch_tokens": 128,
    "train.warmup_steps": 1,
}


def test_steps_for_budget() -> None:
    assert steps_for_budget(1e9, 1e3, 1000) == 1000
    assert steps_for_budget(1.999e9, 1e3, 1000) == 1999  # rounded down: never over the budget
    assert steps_for_budget(1.0, 1e3, 1000) == 1  # at least one step
    with pytest.raises(ValueError, match="positive"):
        steps_for_budget(0, 1e3, 1000)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path, tiny_data_dir: Path) -> tuple:
    out = tmp_path_factory.mktemp("demo") / "run"
    shutil.copytree(tiny_data_dir, out / "data")  # prepared with 20% held out; the demo reuses it
    overrides = {
        "autoencoder": dict(_AE),
        "calm": {**_LM, "train.block_size": 64},
        "gpt": {**_LM, "train.block_size": 32},
    }
    kwargs = dict(
        corpus=[str(tiny_corpus)],
        vocab_size=320,
        eval_data=tiny_corpus / "a.jsonl",
        eval_max_tokens=4096,
        overrides=overrides,
        lm_flops=1e9,
        progress=False,
    )
    summary = run_demo(out, **kwargs)
    return out, summary, kwargs


LM_RUNS = ("calm", "calm_anchored", "gpt")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_gives_every_language_model_the_same_training_flops(demo_run) -> None:
    out, _, _ = demo_run
    steps, flops = {}, {}
    for name in LM_RUNS:
        train = [r for r in _records(out / name / "metrics.jsonl") if r["split"] == "train"]
        steps[name], flops[name] = train[-1]["step"], train[-1]["train_flops"]
        config = json.loads((out / name / "run_config.json").read_text())["train"]
        assert config["eval_every"] == config["save_every"] == -(-steps[name] // 4)
        assert config["precision"] in ("fp32", "bf16") and config["precision_requested"] == "auto"
    for name in LM_RUNS:  # the most whole steps that fit the budget
        per_step = flops[name] / steps[name]
        assert 0 <= 1e9 - flops[name] < per_step
    assert steps["calm"] != steps["gpt"]  # equal FLOPs, not equal steps
    assert steps["calm_anchored"] < steps["calm"]  # the anchored head's readout costs FLOPs


def test_demo_scores_every_model_on_the_same_blocks_and_context(demo_run) -> None:
    out, summary, _ = demo_run
    evals = {name: json.loads((out / f"eval_{name}.json").read_text()) for name in LM_RUNS}
    contexts = {e["context"]["tokens"] for e in evals.values()}
    assert contexts == {72} and {e["context"]["unit"] for e in evals.values()} == {"tokens"}  # GPT: 72 tokens
    assert len({(e["tokens"], e["blocks"]) for e in evals.values()}) == 1
    for e in evals.values():
        assert len(e["per_block"]["sums"]) == len(e["per_block"]["positions"]) == e["blocks"]
        assert sum(e["per_block"]["positions"]) == e["positions"]
        mean = sum(s[0] for s in e["per_block"]["sums"]) / e["positions"]
        assert abs(100 * mean - e["brier1"]) < 1e-9  # the per-block totals are the scores' own
    assert evals["calm"]["positions"] * 4 <= evals["gpt"]["positions"]  # CALM scores chunk starts only


def test_demo_report_names_precisions_models_flops_and_verdict(demo_run) -> None:
    out, summary, _ = demo_run
    report = (out / "report.md").read_text()
    assert "Training precision: autoencoder" in report and "calm_anchored " in report and "gpt " in report
    for name in ("CALM", "CALM-anchored (ours)", "GPT"):
        assert f"| {name} |" in report, name
    assert "| LM training FLOPs | + autoencoder training |" in report
    assert "## Verdict" in report and "one seed" in report and "every model with 72 tokens of context" in report
    assert "**CALM**: Brier-1" in report or "**CALM**: no ratios" in report
    assert "orders of magnitude smaller" in report and "Speeds time sampling at T = 1" in report
    assert (out / "brier_n_vs_flops.png").exists() and "brier_n_vs_flops.png" in report
    assert "## Do continuations follow their prompts?" in report and "| real text |" in report
    assert "calm_anchored energy_diversity_weight=0.6, token_aux_weight=1.0, token_anchor=True" in report
    assert "context_weight" not in report  # the shared autoencoder is the paper's
    assert "## Autoencoder (a.jsonl)" in report and "Scored on a.jsonl" in report  # the evaluation text it used
    following = json.loads((out / "prompt_following.json").read_text())
    assert set(following["results"]) == {"reference", *LM_RUNS}
    assert all(0.0 <= r["auc"] <= 1.0 for r in following["results"].values())
    speed = json.loads((out / "generation_speed.json").read_text())
    assert set(speed["tokens_per_s"]) == set(LM_RUNS) and "T = 1" in speed["what"]
    samples = json.loads((out / "samples.json").read_text())
    assert all(set(LM_RUNS) <= set(row) for row in samples)
    assert summary["eval"]["calm"]["precision"] in ("fp32", "bf16")


def test_demo_rerun_reuses_finished_stages(demo_run, capsys: pytest.CaptureFixture[str]) -> None:
    out, _, kwargs = demo_run
    before = {name: (out / name / "metrics.jsonl").read_text() for name in ("autoencoder", *LM_RUNS)}
    run_demo(out, **kwargs)
    printed = capsys.readouterr().out
    for name in ("autoencoder", *LM_RUNS):
        assert f"reusing {out / name} (finished)" in printed
        assert (out / name / "metrics.jsonl").read_text() == before[name]


def test_demo_applies_its_recipe_under_the_users_overrides(demo_run) -> None:
    from calm.experiments.demo import DEMO_RECIPE

    out, _, _ = demo_run
    ours = DEMO_RECIPE["calm_anchored"]
    model = json.loads((out / "calm_anchored" / "run_config.json").read_text())["model"]
    assert model["token_aux_weight"] == ours["model.token_aux_weight"] > 0
    assert model["energy_diversity_weight"] == ours["model.energy_diversity_weight"] < 1
    assert model["token_anchor"] is ours["model.token_anchor"] is True
    paper = json.loads((out / "calm" / "run_config.json").read_text())["model"]
    defaults = {"token_aux_weight": 0.0, "energy_diversity_weight": 1.0, "token_anchor": False}
    assert {k: paper[k] for k in defaults} == defaults
    ae = json.loads((out / "autoencoder" / "run_config.json").read_text())["model"]
    assert ae["context_weight"] == 0.0  # both CALMs share the paper's autoencoder
    for name in ("calm", "calm_anchored"):  # the user's calm: settings reach both CALMs
        assert json.loads((out / name / "run_config.json").read_text())["train"]["block_size"] == 64
    records = _records(out / "calm_anchored" / "metrics.jsonl")
    assert any("token_aux_loss" in r for r in records if r["split"] == "train")


def test_demo_refuses_an_unknown_run_before_any_work(tmp_path: Path) -> None:
    from calm.config import ConfigError

    with pytest.raises(ConfigError, match="calm_anchored"):
        run_demo(tmp_path / "x", overrides={"calm_ours": {"train.max_steps": 1}}, progress=False)
    assert not (tmp_path / "x").exists()


def _report_run(demo_run, tmp_path: Path) -> Path:
    """A copy of the demo's run directory, without its checkpoints and data (the report reads neither)."""
    out, _, _ = demo_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("checkpoints", "data"))
    (run / "report.md").unlink()
    return run


def test_report_on_a_run_whose_metrics_end_in_a_torn_line_warns_and_writes(
    demo_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from calm.cli import main

    run = _report_run(demo_run, tmp_path)
    metrics = run / "calm" / "metrics.jsonl"
    last = metrics.read_text().splitlines()[-1]
    with open(metrics, "a") as f:
        f.write(last[: len(last) // 2])  # the run was killed while appending a line
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 0
    printed = capsys.readouterr()
    report = (run / "report.md").read_text()
    original = (demo_run[0] / "report.md").read_text()
    assert report.replace(str(run), str(demo_run[0])) == original  # the cut line is skipped: the same report
    assert f"wrote {run / 'report.md'}" in printed.out
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"warning: {metrics}: skipped its last line" in warnings[0], printed.err


def test_report_on_a_damaged_metrics_line_names_it(
    demo_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from calm.cli import main

    run = _report_run(demo_run, tmp_path)
    metrics = run / "gpt" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:-3]
    metrics.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["report", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {metrics}:2 is not valid JSON") and "repair or delete that line" in err, err
    assert not (run / "report.md").exists()


def test_an_unfinished_stage_rerun_with_other_options_is_refused_with_a_hint_that_works_here(
    demo_run, tmp_path: Path
) -> None:
    from calm import checkpoint as ckpt
    from calm.config import ConfigError

    out, _, kwargs = demo_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "gpt" / "DONE.json").unlink()  # the GPT stage was stopped after an earlier checkpoint
    shutil.rmtree(ckpt.list_checkpoints(run / "gpt")[-1])
    before = (run / "gpt" / "metrics.jsonl").read_text()
    overrides = {**kwargs["overrides"], "gpt": {**kwargs["overrides"]["gpt"], "train.lr": 0.01}}
    with pytest.raises(
        ConfigError, match=r"started with other training options \(train\.lr .* -> 0\.01\); rerun the demo"
    ):
        run_demo(run, **{**kwargs, "overrides": overrides})
    assert (run / "gpt" / "metrics.jsonl").read_text() == before  # nothing resumed, nothing cut
