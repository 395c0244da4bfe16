"""``precision: auto``: one resolver decides from the hardware; training, resume and eval obey it."""

from __future__ import annotations

import json

import factories
import pytest
import torch

from calm import hardware as prec
from calm.config import ConfigError, TrainConfig, load_preset, preset_names
from calm.train.loop import run_training
from calm.train.stages import GPTStage

NATIVE_FAST = prec.Probe(native_bf16=True, fp32_gflops=100.0, bf16_gflops=400.0)
NATIVE_SLOW = prec.Probe(native_bf16=True, fp32_gflops=100.0, bf16_gflops=90.0)
EMULATED = prec.Probe(native_bf16=False, fp32_gflops=60.0, bf16_gflops=None)


@pytest.fixture
def cpu_with(monkeypatch: pytest.MonkeyPatch):
    """Pretend the CPU probe found ``probe`` (the one function every caller goes through)."""

    def use(probe: prec.Probe) -> None:
        monkeypatch.setattr(prec, "cpu_probe", lambda: probe)

    return use


@pytest.mark.parametrize(
    ("probe", "expected"), [(NATIVE_FAST, "bf16"), (NATIVE_SLOW, "fp32"), (EMULATED, "fp32")], ids=str
)
def test_auto_resolves_from_the_cpu_probe(cpu_with, probe: prec.Probe, expected: str) -> None:
    cpu_with(probe)
    assert prec.resolve_precision("auto", "cpu") == expected
    assert prec.resolve_precision("fp32", "cpu") == "fp32"
    assert prec.resolve_precision("bf16", "cpu") == "bf16"  # explicit: kept, even where slow


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(prec.PrecisionError, match="auto, fp32, bf16"):
        prec.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="half").validate()


def test_the_real_probe_is_quick_and_consistent() -> None:
    prec.cpu_probe.cache_clear()
    probe = prec.cpu_probe()
    assert probe.fp32_gflops and probe.fp32_gflops > 0
    assert (probe.bf16_gflops is None) == (not probe.native_bf16)  # emulated bf16 is never timed
    assert prec.cpu_probe() is probe  # cached: once per process
    assert prec.resolve_precision("auto", "cpu") == ("bf16" if probe.bf16_fast else "fp32")
    record = prec.probe_record("cpu")
    json.dumps(record, allow_nan=False)
    assert record["native_bf16"] == probe.native_bf16


def test_every_preset_defaults_to_auto() -> None:
    for kind in ("autoencoder", "calm", "gpt"):
        for name in preset_names(kind):
            assert load_preset(kind, name).train.precision == "auto", (kind, name)
    assert TrainConfig().precision == "auto"


def _gpt_stage(data_dir, **train) -> GPTStage:
    """A 1-layer tiny GPT for 2 steps of 64 tokens, saved every step; ``train`` sets the precision."""
    steps = dict(block_size=16, save_every=1, eval_tokens=32, log_every=TrainConfig.log_every)
    cfg = factories.train_config(lr=1e-3, **steps, **train)
    return GPTStage(data_dir, factories.gpt_config(num_layers=1, num_heads=2), cfg)


def _autocast_seen(stage: GPTStage) -> list[bool]:
    """Wrap the stage's loss to record whether each training forward ran under bf16 autocast."""
    seen: list[bool] = []
    loss = stage.loss

    def spy(model, batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return loss(model, batch)

    stage.loss = spy
    return seen


@pytest.mark.parametrize(("probe", "expected"), [(NATIVE_FAST, "bf16"), (EMULATED, "fp32")], ids=["native", "none"])
def test_training_runs_in_the_resolved_precision(cpu_with, tiny_data_dir, tmp_path, probe, expected) -> None:
    cpu_with(probe)
    stage = _gpt_stage(tiny_data_dir, precision="auto")
    seen = _autocast_seen(stage)
    run_training(stage, stage.train_config, tmp_path / "run", progress=False, device=torch.device("cpu"))
    assert seen == [expected == "bf16"] * 2
    train = json.loads((tmp_path / "run" / "run_config.json").read_text())["train"]
    assert train["precision"] == expected and train["precision_requested"] == "auto"


def test_a_resumed_run_keeps_its_precision(cpu_with, tiny_data_dir, tmp_path) -> None:
    out = tmp_path / "run"
    cpu_with(NATIVE_FAST)
    stage = _gpt_stage(tiny_data_dir, precision="auto")
    stage.train_config.max_steps = 1
    run_training(stage, stage.train_config, out, progress=False, device=torch.device("cpu"))

    cpu_with(EMULATED)  # the run moves to a CPU where auto would now mean fp32
    stage = _gpt_stage(tiny_data_dir, precision="auto")
    seen = _autocast_seen(stage)
    run_training(stage, stage.train_config, out, resume=True, progress=False, device=torch.device("cpu"))
    assert seen == [True]  # step 2 still in bf16
    assert json.loads((out / "run_config.json").read_text())["train"]["precision"] == "bf16"

    stage = _gpt_stage(tiny_data_dir, precision="fp32")
    stage.train_config.max_steps = 3
    with pytest.raises(ConfigError, match="started in bf16"):
        run_training(stage, stage.train_config, out, resume=True, progress=False, device=torch.device("cpu"))


def test_eval_records_the_resolved_precision(cpu_with, tiny_data_dir, tmp_path) -> None:
    from calm.eval.brier import evaluate_checkpoint

    cpu_with(EMULATED)
    stage = _gpt_stage(tiny_data_dir, precision="auto")
    run_training(stage, stage.train_config, tmp_path / "run", progress=False, device=torch.device("cpu"))
    out = evaluate_checkpoint(
        str(tmp_path / "run"), str(tiny_data_dir), context_tokens=16, max_blocks=2, progress=False, device="cpu"
    )
    assert out["precision"] == "fp32"
    cpu_with(NATIVE_FAST)
    out = evaluate_checkpoint(
        str(tmp_path / "run"), str(tiny_data_dir), context_tokens=16, max_blocks=2, progress=False, device="cpu"
    )
    assert out["precision"] == "bf16"


def test_the_decoder_screen_asks_the_resolver(cpu_with, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded autoencoder's vocabulary argmax screens in bf16 only where the resolver finds bf16 fast; the
    model itself never asks (``calm.checkpoint.use_fast_argmax`` tells it); the result is exact either way."""
    from calm.checkpoint import fast_argmax_screens, use_fast_argmax
    from calm.models import vocab_search

    ae = factories.tiny_autoencoder(vocab=30_000, hidden_size=64, intermediate_size=64).eval()
    hidden = torch.randn(560, 64, generator=torch.Generator().manual_seed(0))  # 560 x 30,000 >= 2^24 logits
    reference = (hidden @ ae.embed_tokens.weight.t()).argmax(-1)
    screened = []
    real = vocab_search.bf16_screened_argmax
    monkeypatch.setattr(vocab_search, "bf16_screened_argmax", lambda *a: screened.append(1) or real(*a))
    assert torch.equal(ae.vocab_argmax(hidden), reference) and not screened  # not told: the plain product
    use_fast_argmax(ae)
    cpu_with(EMULATED)
    assert not fast_argmax_screens(torch.device("cpu")).bf16
    assert torch.equal(ae.vocab_argmax(hidden), reference) and not screened
    cpu_with(NATIVE_FAST)
    assert fast_argmax_screens(torch.device("cpu")).bf16
    assert torch.equal(ae.vocab_argmax(hidden), reference) and len(screened) == 1
