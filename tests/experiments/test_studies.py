"""Named ablation studies (calm/experiments/studies.py, `calm sweep --study`): what each expands to, seeds, scales,
errors, and the seed summary of the results (calm/experiments/sweep_results.py)."""

import json
import math

import pytest
from factories import SMALL_AE, SMALL_CALM

from calm.cli import main
from calm.config import load_preset, parse_override
from calm.experiments.studies import STUDIES, TINY, study_spec
from calm.experiments.sweep import plan_sweep, run_sweep, sweep_from_dict
from calm.models.flops import calm_flops

VOCAB = 4096
AE_RECIPE = {"kl_mode": "clipped", "kl_weight": 1e-3, "token_dropout": 0.15, "latent_dropout": 0.15}


def plan(name, tmp_path, **kw):
    """The planned runs of a study on data that is not prepared (the default vocabulary)."""
    spec = study_spec(name, tmp_path / "data", **kw)
    return spec, plan_sweep(spec, tmp_path / "out", vocab_size=VOCAB)


def model(run):
    return load_preset(run.kind, run.preset, run.overrides).model


def by_kind(runs, kind):
    return [r for r in runs if r.kind == kind]


def assert_equal_budgets(runs):
    """Every run of a kind spends the same training FLOPs, up to one optimizer step's worth."""
    for kind in ("autoencoder", "calm"):
        group = by_kind(runs, kind)
        step = max(r.flops_per_token * r.batch_tokens for r in group)
        assert max(r.train_flops for r in group) - min(r.train_flops for r in group) <= step
        assert len({r.budget for r in group}) == 1


@pytest.mark.parametrize(
    "name, key, values",
    [
        ("heads", "head", ["energy", "flow", "diffusion"]),
        ("input", "input", ["discrete", "continuous", "both"]),
    ],
)
def test_shared_autoencoder_studies_vary_one_calm_setting(tmp_path, name, key, values):
    _, runs = plan(name, tmp_path)
    assert [r.name for r in runs] == ["ae"] + [f"{v}-ae=ae" for v in values]
    calm = by_kind(runs, "calm")
    assert [getattr(model(r), key) for r in calm] == values
    assert {r.autoencoder for r in calm} == {str((tmp_path / "out" / "ae").resolve())}
    assert_equal_budgets(runs)
    if name == "heads":
        passes = [r.costs["head_passes_per_sample"] for r in calm]
        assert passes == [1, 2 * model(calm[1]).flow_steps, model(calm[2]).diffusion_steps]
        diffusion = calm[2].overrides
        assert diffusion["train.eval_tokens"] < calm[0].overrides["train.eval_tokens"]
        assert diffusion["train.eval_every"] >= diffusion["train.max_steps"]  # evaluated once, at the end


def test_energy_loss_changes_one_knob_at_a_time(tmp_path):
    _, runs = plan("energy-loss", tmp_path)
    calm = by_kind(runs, "calm")
    knobs = ("num_samples", "num_target_samples", "energy_alpha")
    default = {k: getattr(model(calm[0]), k) for k in knobs}
    assert default == {"num_samples": 8, "num_target_samples": 100, "energy_alpha": 1.0}
    changed = [{k: getattr(model(r), k) for k in knobs if getattr(model(r), k) != default[k]} for r in calm[1:]]
    assert changed == [{"num_samples": 2}, {"num_target_samples": 16}, {"energy_alpha": 0.5}, {"energy_alpha": 1.5}]
    assert_equal_budgets(runs)
    assert calm[1].max_steps > calm[0].max_steps  # N = 2 is cheaper per token: more steps for the same FLOPs


def test_ae_regularisers_undo_exactly_one_switch_per_run(tmp_path):
    _, runs = plan("ae-regularisers", tmp_path)
    ae, calm = by_kind(runs, "autoencoder"), by_kind(runs, "calm")
    settings = [{k: getattr(model(r), k) for k in AE_RECIPE} for r in ae]
    assert settings[0] == AE_RECIPE  # the paper's full recipe (§3: clipped KL, DropToken, DropLatent)
    diffs = [{k: v for k, v in s.items() if v != AE_RECIPE[k]} for s in settings[1:]]
    assert diffs == [{"kl_mode": "off"}, {"kl_mode": "plain"}, {"token_dropout": 0.0}, {"latent_dropout": 0.0}]
    # one CALM per autoencoder, on that autoencoder, all with the same CALM settings
    assert [r.autoencoder for r in calm] == [str((tmp_path / "out" / a.name).resolve()) for a in ae]
    assert len({json.dumps(model(r).__dict__, sort_keys=True) for r in calm}) == 1
    assert_equal_budgets(runs)


def test_latent_size_scales_dropout_as_the_paper(tmp_path):
    _, runs = plan("latent-size", tmp_path)
    ae = [model(r) for r in by_kind(runs, "autoencoder")]
    assert [(m.latent_size, m.token_dropout, m.latent_dropout) for m in ae] == [
        (32, 0.05, 0.05),
        (64, 0.1, 0.1),
        (128, 0.15, 0.15),
        (256, 0.2, 0.2),
    ]
    assert_equal_budgets(runs)


def test_chunk_size_pairs_each_k_with_latent_32k_and_a_calm_of_that_k(tmp_path):
    _, runs = plan("chunk-size", tmp_path)
    ae, calm = by_kind(runs, "autoencoder"), by_kind(runs, "calm")
    assert [(model(r).chunk_size, model(r).latent_size) for r in ae] == [(1, 32), (2, 64), (4, 128), (8, 256)]
    block = calm[0].overrides["train.block_size"] if "train.block_size" in calm[0].overrides else 1024
    for k, ae_run, run in zip((1, 2, 4, 8), ae, calm):
        assert run.autoencoder.endswith(ae_run.name)
        config, ae_config = model(run), model(ae_run)
        config.vocab_size = ae_config.vocab_size = VOCAB
        config.chunk_size, config.latent_size = k, 32 * k
        assert config.max_seq_len == block // k  # the same 1024-token context at every K
        # the plan costed this run as a CALM of chunk size K on that autoencoder
        assert run.flops_per_token == calm_flops(config, ae_config, context=block // k)["train_flops_per_token"]
    assert_equal_budgets(runs)
    assert [r.max_steps for r in calm] == sorted(r.max_steps for r in calm)  # larger K: cheaper tokens


def test_seeds_repeat_every_setting(tmp_path):
    _, runs = plan("heads", tmp_path, seeds=3)
    calm = by_kind(runs, "calm")
    assert len(by_kind(runs, "autoencoder")) == 1 and len(calm) == 9
    assert sorted(r.overrides["train.seed"] for r in calm) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    # an autoencoder study: seed s trains its own autoencoder and the CALM on it, both with seed s
    _, runs = plan("ae-regularisers", tmp_path, seeds=2)
    ae, calm = by_kind(runs, "autoencoder"), by_kind(runs, "calm")
    assert len(ae) == len(calm) == 10
    seed_of = {str((tmp_path / "out" / r.name).resolve()): r.overrides["train.seed"] for r in ae}
    assert all(r.overrides["train.seed"] == seed_of[r.autoencoder] for r in calm)
    assert sorted(seed_of.values()) == [1] * 5 + [2] * 5


@pytest.mark.parametrize("name", list(STUDIES))
@pytest.mark.parametrize("scale", ["S", "M"])
def test_paper_scale_specs_plan(tmp_path, name, scale):
    spec, runs = plan(name, tmp_path, scale=scale)
    calm = by_kind(runs, "calm")
    assert {r.preset for r in calm} == {scale} and {r.preset for r in by_kind(runs, "autoencoder")} == {"paper"}
    assert max(r.max_steps for r in calm) >= 50_000 and spec.evals == 10
    assert_equal_budgets(runs)


def test_tiny_budgets_stay_small(tmp_path):
    """The tiny defaults: at most a few hundred optimizer steps per run, half the preset's batch."""
    for name in STUDIES:
        _, runs = plan(name, tmp_path)
        assert all(r.max_steps <= 600 for r in runs), name
        assert all(r.batch_tokens == TINY.calm_set["train.batch_tokens"] for r in by_kind(runs, "calm"))


def test_study_errors(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["sweep", "--study", "bogus", "--out", out]) == 2
    assert "unknown study 'bogus'; choose one of heads, input" in capsys.readouterr().err
    assert main(["sweep", "--study", "heads", "--scale", "XXL", "--out", out, "--dry-run"]) == 2
    assert "unknown calm preset 'XXL'" in capsys.readouterr().err
    assert main(["sweep", "--study", "heads", "--seeds", "0", "--out", out, "--dry-run"]) == 2
    assert "--seeds must be a positive integer" in capsys.readouterr().err
    assert main(["sweep", "--study", "latent-size", "--autoencoder", out, "--out", out, "--dry-run"]) == 2
    assert "trains one autoencoder per variant" in capsys.readouterr().err
    assert main(["sweep", "--study", "heads", "--kind", "gpt", "--out", out, "--dry-run"]) == 2
    assert "--study builds its own spec; drop --kind" in capsys.readouterr().err
    assert main(["sweep", "--seeds", "2", "--out", out, "--dry-run"]) == 2
    assert "--seeds applies to named studies" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_cli_dry_run_prints_the_plan_without_preparing_data(tmp_path, capsys, monkeypatch):
    import calm.experiments.demo

    monkeypatch.setattr(calm.experiments.demo, "prepare", lambda *a, **k: pytest.fail("a dry run prepared data"))
    assert main(["sweep", "--study", "energy-loss", "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ae: 500 steps x 2048 tokens" in out and "N2-ae=ae: " in out and "alpha1.5-ae=ae: " in out
    assert not (tmp_path / "s").exists()


def test_cli_study_prepares_default_data_when_none_is_given(tmp_path, monkeypatch):
    """Without --data the study prepares `calm demo`'s default data in OUT/data, then sweeps it."""
    import calm.experiments.demo
    import calm.experiments.studies

    calls = []
    monkeypatch.setattr(calm.experiments.demo, "prepare", lambda out, **kw: calls.append((out, kw)))
    monkeypatch.setattr(
        calm.experiments.studies, "run_sweep", lambda spec, out, **kw: calls.append((spec.data, kw["title"]))
    )
    assert main(["sweep", "--study", "input", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    (prepared, kw), (data, title) = calls
    assert str(prepared) == data == str(tmp_path / "s" / "data")
    assert kw["sources"] == ["default"] and kw["vocab_size"] == 4096 and title.startswith("Study input:")


def test_yaml_1_1_words_stay_words_in_overrides():
    """`--set model.kl_mode=off` is the word off (YAML 1.1 would read a boolean)."""
    assert parse_override("model.kl_mode=off") == ("model.kl_mode", "off")
    assert parse_override("train.compile=true") == ("train.compile", True)
    assert load_preset("autoencoder", "tiny", dict([parse_override("model.kl_mode=off")])).model.kl_mode == "off"


def test_seed_replicates_are_summarised_in_the_results(data_dir, tmp_path):
    """A micro sweep with two seeds per setting: results.md gets mean ± sd [min, max] per setting."""
    spec = sweep_from_dict(
        {
            "data": str(data_dir),
            "budget": {"tokens": 256},
            "evals": 1,
            "metrics": ["brier1", "energy_loss", "train/loss"],
            "groups": [
                {"kind": "autoencoder", "name": "ae", "set": SMALL_AE, "budget": {"tokens": 512}},
                {"kind": "calm", "name": "n", "autoencoder": "@ae", "set": SMALL_CALM, "grid": {"train.seed": [1, 2]}},
            ],
        }
    )
    out = tmp_path / "out"
    rows = run_sweep(spec, out, progress=False, echo=lambda *a: None, title="Study micro")
    calm = [r for r in rows if r["kind"] == "calm"]
    assert [r["head_passes_per_sample"] for r in calm] == [1, 1] and calm[0]["head_flops_per_sample"] > 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    entry = next(e for e in summary if e["group"] == "n")
    values = [r["train/loss"] for r in calm]
    assert entry["n"] == 2 and values[0] != values[1]  # the seeds differ
    assert entry["train/loss"] == pytest.approx(sum(values) / 2)
    assert entry["train/loss_sd"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert (entry["train/loss_min"], entry["train/loss_max"]) == (min(values), max(values))
    md = (out / "results.md").read_text()
    assert md.startswith("# Study micro (3 runs") and "## Mean over seeds" in md and " ± " in md
