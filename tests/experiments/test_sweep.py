"""The experiment runner (calm/experiments/sweep.py): spec errors, budgets -> steps, resumable runs, results."""

import importlib.util
import json
import math
import shutil

import pytest
import yaml
from factories import SMALL_AE, SMALL_CALM, SMALL_GPT, SMALL_LM

from calm.cli import main
from calm.config import ConfigError
from calm.experiments.sweep import Budget, load_sweep, plan_sweep, run_sweep, spec_from_cli, sweep_from_dict


def untimed(path):
    """metrics.jsonl records without the wall-clock fields."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in records]


def spec_dict(data_dir, **kw):
    raw = {
        "data": str(data_dir),
        "budget": {"tokens": 256},
        "evals": 2,
        "metrics": ["brier1", "cond_gap", "token_accuracy", "train/loss", "nonexistent_metric"],
        "groups": [
            {"kind": "autoencoder", "name": "ae", "set": SMALL_AE, "budget": {"tokens": 1024}},
            {"kind": "calm", "autoencoder": "@ae", "set": SMALL_CALM, "grid": {"model.num_head_blocks": [1, 2]}},
            {"kind": "gpt", "set": SMALL_GPT, "grid": {"train.lr": [1.0e-3, 3.0e-3]}},
        ],
    }
    raw.update(kw)
    return raw


@pytest.mark.parametrize(
    "change, message",
    [
        ({"groups": []}, "non-empty list"),
        ({"data": None}, "needs 'data'"),
        ({"bogus": 1}, "unknown sweep keys"),
        ({"budget": {"flops": 1, "tokens": 2}}, "exactly one of flops or tokens"),
        ({"budget": {"flops": -1}}, "positive"),
        ({"budget": {"steps": 3}}, "one of 'flops' or 'tokens'"),
        ({"evals": 0}, "evals must be a positive integer"),
        ({"groups": [{"kind": "bert"}]}, "kind must be one of"),
        ({"groups": [{"kind": "gpt", "grid": {"train.lr": 1e-3}}]}, "non-empty list of values"),
        ({"groups": [{"kind": "gpt", "grid": {"train.lr": []}}]}, "non-empty list of values"),
        ({"groups": [{"kind": "gpt", "colour": "red"}]}, "unknown keys"),
        ({"groups": [{"kind": "gpt", "name": "a/b"}]}, "may only use letters"),
        ({"groups": [{"kind": "gpt"}, {"kind": "gpt"}]}, "two groups are named 'gpt'"),
    ],
)
def test_bad_specs_are_named(data_dir, change, message):
    with pytest.raises(ConfigError, match=message):
        sweep_from_dict(spec_dict(data_dir, **change))


@pytest.mark.parametrize(
    "groups, message",
    [
        ([{"kind": "calm", "set": SMALL_CALM}], "set 'autoencoder'"),
        ([{"kind": "calm", "autoencoder": "@nope"}], "earlier autoencoder group"),
        ([{"kind": "gpt", "set": {"train.max_steps": 5}}], "derived from the budget"),
        ([{"kind": "gpt", "set": {"model.widht": 5}}], r"run gpt: unknown GPTConfig keys \['widht'\]"),
        ([{"kind": "gpt", "preset": "huge"}], "unknown gpt preset"),
        ([{"kind": "gpt", "set": SMALL_GPT, "budget": {"tokens": 10}}], "less than one optimizer step"),
        ([{"kind": "gpt", "set": SMALL_LM}], "exceeds max_seq_len"),
        ([{"kind": "gpt", "autoencoder": "x"}], "only calm groups"),
    ],
)
def test_bad_plans_fail_before_anything_trains(data_dir, tmp_path, groups, message):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(sweep_from_dict(spec_dict(data_dir, groups=groups)), tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_budget_in_flops_sets_steps_from_each_runs_cost(data_dir, tmp_path):
    from calm.config import load_preset
    from calm.models.flops import gpt_flops

    spec = sweep_from_dict(
        spec_dict(
            data_dir,
            budget={"flops": 3.0e9},
            groups=[{"kind": "gpt", "set": SMALL_GPT, "grid": {"model.num_layers": [1, 2]}}],
        )
    )
    runs = plan_sweep(spec, tmp_path)
    assert [r.name for r in runs] == ["gpt-num_layers=1", "gpt-num_layers=2"]
    for run in runs:
        cfg = load_preset("gpt", "tiny", run.overrides).model
        cfg.vocab_size = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
        fpt = gpt_flops(cfg, context=32)["train_flops_per_token"]
        assert run.flops_per_token == fpt
        assert run.max_steps == math.floor(3.0e9 / (fpt * 64)) and run.train_flops <= 3.0e9
        assert run.overrides["train.eval_every"] == math.ceil(run.max_steps / 2)
    assert runs[0].max_steps > runs[1].max_steps  # the cheaper model gets more steps
    assert Budget(tokens=640).max_steps(1.0, 64) == 10


def test_sweep_trains_resumes_skips_and_writes_results(data_dir, tmp_path):
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(data_dir)))
    spec, out = load_sweep(spec_path), tmp_path / "out"
    rows = run_sweep(spec, out, progress=False, echo=lambda *a: None)
    names = [r["run"] for r in rows]
    assert names == [
        "ae",
        "calm-num_head_blocks=1-ae=ae",
        "calm-num_head_blocks=2-ae=ae",
        "gpt-lr=0.001",
        "gpt-lr=0.003",
    ]
    assert all(r["status"] == "done" for r in rows)
    assert [r["steps"] for r in rows] == [4, 4, 4, 4, 4]  # 1,024 / 256 and 256 / 64 tokens per step
    by = {r["run"]: r for r in rows}
    assert by["calm-num_head_blocks=1-ae=ae"]["cond_gap"] is not None and by["gpt-lr=0.001"]["cond_gap"] is None
    assert by["ae"]["token_accuracy"] is not None and len(by["gpt-lr=0.003"]["curves"]["brier1"]) == 2
    assert by["calm-num_head_blocks=2-ae=ae"]["train_flops"] > by["calm-num_head_blocks=1-ae=ae"]["train_flops"]
    for name in ("results.md", "results.csv", "results.json", "results.png", "sweep.yaml"):
        assert (out / name).exists(), name
    assert "| model.num_head_blocks |" in (out / "results.md").read_text()
    header = next(line for line in (out / "results.csv").read_text().splitlines())
    table = [line.split(",") for line in (out / "results.csv").read_text().splitlines()[1:]]
    assert all(any(row[i] for row in table) for i in range(3, len(table[0]))), header  # no column empty throughout
    assert "nonexistent_metric" not in header  # asked for, logged by no run
    assert (
        json.loads((out / "calm-num_head_blocks=2-ae=ae" / "run_config.json").read_text())["model"]["num_head_blocks"]
        == 2
    )

    # interrupted run: drop its DONE marker and its last checkpoint; the rerun resumes from step 2
    run_dir = out / "gpt-lr=0.003"
    before = run_dir / "before.jsonl"
    shutil.copy(run_dir / "metrics.jsonl", before)
    (run_dir / "DONE.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    finished = {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in names if n != run_dir.name}
    rows2 = run_sweep(spec, out, progress=False, echo=lambda *a: None)
    assert untimed(run_dir / "metrics.jsonl") == untimed(before)  # bit-identical continuation on CPU
    assert [r["brier1"] for r in rows2] == [r["brier1"] for r in rows]
    assert finished == {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in finished}  # skipped

    # a changed budget for existing folders is refused instead of silently mixing plans, by the dry run too
    changed = sweep_from_dict(spec_dict(data_dir, budget={"tokens": 512}))
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match="planned differently"):
            run_sweep(changed, out, dry_run=dry_run, progress=False, echo=lambda *a: None)
    # calm report rebuilds the results from the run folders alone, title included
    expected = {name: (out / name).read_text() for name in ("results.md", "results.csv")}
    for name in ("results.md", "results.csv", "results.json", "results.png"):
        (out / name).unlink()
    (out / "results.md").write_text("# A titled study (5 runs; budget per run: old)\n")
    assert main(["report", "--run", str(out)]) == 0
    assert (out / "results.csv").read_text() == expected["results.csv"]
    assert (out / "results.md").read_text() == expected["results.md"].replace("Sweep results", "A titled study", 1)
    assert (out / "results.png").exists() == (importlib.util.find_spec("matplotlib") is not None)

    lines: list[str] = []
    (run_dir / "DONE.json").unlink()
    assert run_sweep(spec, out, dry_run=True, echo=lines.append) == []
    assert lines[0].endswith("(done)") and lines[-1].endswith("(started: resumes)")


def test_cli_grid_dry_run_and_errors(data_dir, tmp_path, capsys):
    args = ["sweep", "--out", str(tmp_path / "s"), "--data", str(data_dir), "--kind", "gpt", "--dry-run"]
    args += ["--grid", "train.lr=1e-3,3e-3", "--budget-tokens", "6400"]
    args += [f"--set={k}={v}" for k, v in SMALL_GPT.items()]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gpt-lr=0.001: 100 steps x 64 tokens" in out and "gpt-lr=0.003" in out
    assert not (tmp_path / "s").exists()  # a dry run writes nothing

    assert main(["sweep", "--out", str(tmp_path / "s"), "--data", str(data_dir), "--grid", "train.lr=1,2"]) == 2
    assert "add --kind" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "s")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_spec_from_cli_adds_a_group_to_a_file(data_dir, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec_dict(data_dir, groups=[{"kind": "gpt", "name": "base"}])))
    spec = spec_from_cli(str(path), kind="gpt", name="wide", grid=["model.hidden_size=[64, 128]"], metrics="brier1")
    assert [g.name for g in spec.groups] == ["base", "wide"]
    assert spec.groups[1].grid == {"model.hidden_size": [64, 128]} and spec.metrics == ["brier1"]


def test_a_diverging_run_is_recorded_as_failed_and_the_sweep_goes_on(data_dir, tmp_path, monkeypatch):
    import calm.train.loop
    from calm.train.loop import NonFiniteError

    real = calm.train.loop.run_training

    def diverge_at_high_lr(stage, cfg, out, **kw):
        if cfg.lr > 2e-3:
            raise NonFiniteError("non-finite loss at step 3 of stage gpt")
        return real(stage, cfg, out, **kw)

    monkeypatch.setattr(calm.train.loop, "run_training", diverge_at_high_lr)
    spec = sweep_from_dict(spec_dict(data_dir, groups=[spec_dict(data_dir)["groups"][2]]))
    rows = run_sweep(spec, tmp_path / "out", progress=False, echo=lambda *a: None)
    assert [r["status"] for r in rows] == ["done", "failed: non-finite loss at step 3 of stage gpt"]
    assert "failed: non-finite" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize(("low", "high"), [(2e12, 8e12), (3e12, 4e12), (1e12, 5e13), (1e10, 1e14)])
def test_every_panel_of_the_sweep_plot_labels_its_x_axis(low, high):
    """A sweep at one budget spans a fraction of a decade of FLOPs, where a log axis has no power of ten
    to label; each panel (the head-cost one too) must still show at least two labelled ticks."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from calm.experiments.sweep_results import results_figure

    def row(name: str, scale: float) -> dict:
        curve = [(low * scale, 0.1), (high * scale, 0.2)]
        return {"run": name, "group": name, "curves": {"brier1": curve}, "brier1": 0.2, "head_flops_per_sample": scale}

    fig = results_figure([row("a", 1.0), row("b", 1.5)], ["brier1"])
    fig.canvas.draw()
    try:
        for ax in fig.axes:
            lo, hi = sorted(ax.get_xlim())
            labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
            assert len(labels) >= 2, (ax.get_title(), labels)
    finally:
        plt.close(fig)
