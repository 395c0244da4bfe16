"""``--set`` overrides: every value is checked against its field's type, and an override that a run
would silently replace (a value the stage takes from the tokenizer or the autoencoder) is refused.

The walks cover every field of every config kind through the real CLI (``calm train-*`` and
``calm demo``), so a field added later is covered too.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import fields
from pathlib import Path

import factories
import pytest

from calm.cli import main
from calm.config import DERIVED_FIELDS, MODEL_CONFIGS, ConfigError, TrainConfig, config_from_dict

COMMANDS = {"autoencoder": "train-ae", "calm": "train-calm", "gpt": "train-gpt"}


def _field_cases() -> list[tuple[str, str, str, str]]:
    """(kind, section, field, wrongly typed value) for every field of every kind."""
    cases = []
    for kind, cls in MODEL_CONFIGS.items():
        for section, section_cls in (("model", cls), ("train", TrainConfig)):
            hints = typing.get_type_hints(section_cls)
            for f in fields(section_cls):
                bad = "123" if hints[f.name] is str else "abc"  # YAML reads 123 as an integer
                cases.append((kind, section, f.name, bad))
    return cases


FIELD_CASES = _field_cases()


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def _train_argv(kind: str, tmp_path: Path, override: str) -> list[str]:
    argv = [COMMANDS[kind], "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--no-progress"]
    if kind == "calm":
        argv += ["--autoencoder", str(tmp_path / "no-ae")]
    return [*argv, "--set", override]


@pytest.mark.parametrize("route", ["train", "demo"])
@pytest.mark.parametrize("kind,section,name,bad", FIELD_CASES, ids=[f"{k}:{s}.{n}" for k, s, n, _ in FIELD_CASES])
def test_every_field_refuses_a_wrongly_typed_value(kind, section, name, bad, route, tmp_path, capsys):
    key = f"{section}.{name}"
    if route == "train":
        argv = _train_argv(kind, tmp_path, f"{key}={bad}")
    else:
        argv = ["demo", "--out", str(tmp_path / "demo"), "--no-progress", "--set", f"{kind}:{key}={bad}"]
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"{key}=" in err and bad in err, err
    if key not in DERIVED_FIELDS[kind]:
        assert "expects" in err, err  # names the expected type
    assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists()


DERIVED_CASES = [(kind, key) for kind, keys in DERIVED_FIELDS.items() for key in keys]


@pytest.mark.parametrize("kind,key", DERIVED_CASES, ids=[f"{k}:{key}" for k, key in DERIVED_CASES])
def test_every_derived_field_override_is_refused_naming_its_source(kind, key, tmp_path, capsys):
    for argv in (
        _train_argv(kind, tmp_path, f"{key}=64"),
        ["demo", "--out", str(tmp_path / "demo"), "--no-progress", "--set", f"{kind}:{key}=64"],
    ):
        code, err = _run(argv, capsys)
        assert code == 2 and err.startswith("error: ") and f"{key}=64" in err, err
        assert DERIVED_FIELDS[kind][key] in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists()


def test_common_mistakes_are_named(tmp_path, capsys):
    """A word for a number, a value the autoencoder decides, a kind the demo does not have."""
    code, err = _run(_train_argv("gpt", tmp_path, "model.num_layers=abc"), capsys)
    assert code == 2 and "model.num_layers='abc'" in err and "integer" in err
    for override in ("model.latent_size=64", "model.chunk_size=0"):
        code, err = _run(_train_argv("calm", tmp_path, override), capsys)
        assert code == 2 and "autoencoder" in err, err
    code, err = _run(["demo", "--out", str(tmp_path / "d"), "--set", "ae:train.precision=fp32"], capsys)
    assert code == 2 and "autoencoder, calm, calm_anchored, gpt" in err, err


def test_values_are_coerced_only_where_lossless() -> None:
    cfg = config_from_dict(TrainConfig, {"batch_tokens": 1e6, "lr": 1, "micro_batch_tokens": None})
    assert cfg.batch_tokens == 1_000_000 and type(cfg.batch_tokens) is int
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    for values in ({"batch_tokens": 1.5}, {"batch_tokens": True}, {"lr": None}, {"compile": 1}, {"precision": 16}):
        with pytest.raises(ConfigError, match="expects"):
            config_from_dict(TrainConfig, values, "train")


# ------------------------------------------------------------------------------------------------
# Completeness of DERIVED_FIELDS: build each stage with every model field changed to another valid
# value; the fields in which the stage's ``config`` differs from the config passed in must be exactly
# the ones the table refuses (and the config passed in is never changed).


def _other(name: str, value):
    if value is None:
        return {"num_kv_heads": 2, "num_head_blocks": 2}[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):  # a choice: another valid one
        return {"kl_mode": "plain", "head": "flow", "input": "both"}[name]
    if isinstance(value, int):
        return value * 2 if value else 1
    return value / 2 if value else 0.1


TINY = {
    "autoencoder": (factories.TINY_AE, {"block_size": 16}),
    "calm": (factories.TINY_CALM, {"block_size": 32}),
    "gpt": (factories.TINY_GPT, {"block_size": 16}),
}


COMPANIONS = {"token_anchor": {"token_aux_weight": 0.3}}
"""Fields the config only accepts together with another: the anchored head needs its readout trained."""


@pytest.fixture(scope="module")
def trained_ae(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step run of the tiny autoencoder (``factories.TINY_AE``) through ``calm train-ae``."""
    out = tmp_path_factory.mktemp("ae") / "ae"
    argv = ["train-ae", "--data", str(data_dir), "--out", str(out), "--batch-tokens", "64", "--max-steps", "1"]
    argv += ["--precision", "fp32", "--no-progress", "--set", "train.eval_tokens=64"]
    assert main([*argv, *factories.set_args(factories.dotted("model", factories.TINY_AE))]) == 0
    return out


@pytest.mark.parametrize("kind", list(MODEL_CONFIGS))
def test_derived_fields_are_exactly_the_fields_a_stage_replaces(kind, data_dir, trained_ae):
    from calm.train.stages import AutoencoderStage, CALMStage, GPTStage

    model_values, train_values = TINY[kind]
    train_values = {**train_values, "batch_tokens": 64, "eval_tokens": 64}

    def build(model_config):
        train = config_from_dict(TrainConfig, train_values)
        if kind == "autoencoder":
            return AutoencoderStage(data_dir, model_config, train)
        if kind == "calm":
            return CALMStage(data_dir, model_config, train, trained_ae)
        return GPTStage(data_dir, model_config, train)

    replaced = set()
    for f in fields(MODEL_CONFIGS[kind]):
        config = config_from_dict(MODEL_CONFIGS[kind], model_values)
        setattr(config, f.name, _other(f.name, getattr(config, f.name)))
        for key, value in COMPANIONS.get(f.name, {}).items():  # a switch that needs another field set
            setattr(config, key, value)
        given = copy.deepcopy(config)
        built = build(config).config
        assert config == given, f"building the {kind} stage changed the config passed in"
        replaced |= {f"model.{g.name}" for g in fields(config) if getattr(built, g.name) != getattr(config, g.name)}
    assert replaced == {k for k in DERIVED_FIELDS[kind] if k.startswith("model.")}
