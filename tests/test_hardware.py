"""``precision: auto`` and the thread count: one module decides from the hardware; training, resume and eval obey it."""

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


# threads -------------------------------------------------------------------------------------


def test_thread_counts_probed_are_powers_of_two_and_the_default() -> None:
    assert prec.thread_counts_to_probe(1) == [1]
    assert prec.thread_counts_to_probe(2) == [1, 2]
    assert prec.thread_counts_to_probe(6) == [1, 2, 4, 6]


@pytest.mark.parametrize(
    ("rates", "default", "load", "expected"),
    [
        ({1: 61.0, 2: 78.0}, 2, 1.5, 2),  # idle 2-core machine (measured: 0.64-0.86 efficiency)
        ({1: 75.0, 2: 42.0}, 2, 1.5, 1),  # one other busy process (measured: 0.25-0.40)
        ({1: 75.0, 2: 42.0}, 2, 0.2, 2),  # nothing else runs: a slow probe alone changes nothing
        ({1: 60.0, 2: 110.0, 4: 100.0, 8: 90.0}, 8, 4.0, 2),  # half the cores busy: 2 threads win
        ({1: 60.0, 2: 100.0, 4: 130.0}, 4, 2.0, 4),  # 0.54 efficiency: kept
    ],
)
def test_the_default_is_kept_unless_it_is_far_below_its_own_peak(rates, default, load, expected) -> None:
    assert prec.choose_threads(rates, default, load) == expected


def test_threads_asked_for_or_set_in_the_environment_are_used_as_given(monkeypatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # `make test` sets it
    try:
        choice = prec.configure_threads(1)
        assert (choice.threads, choice.source, torch.get_num_threads()) == (1, "--threads", 1)
        assert choice.warning() is None
        torch.set_num_threads(2)
        monkeypatch.setattr(prec, "_load_average", lambda: 0.1)
        assert prec.configure_threads().source == "default"  # an idle machine is not probed
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert prec.configure_threads().source == "OMP_NUM_THREADS"
        with pytest.raises(ValueError, match="--threads must be >= 1"):
            prec.configure_threads(0)
    finally:
        torch.set_num_threads(before)


def test_a_busy_machine_is_named_in_the_warning(monkeypatch) -> None:
    """The probe is replaced by the rates measured beside one busy process on a 2-core machine."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(prec, "_probe_threads", lambda default: {1: 75.0, 2: 42.0})
    monkeypatch.setattr(prec, "_load_average", lambda: 1.5)
    try:
        torch.set_num_threads(2)
        choice = prec.configure_threads()
        assert (choice.threads, choice.default, torch.get_num_threads()) == (1, 2, 1)
        warning = choice.warning()
        assert warning.startswith("the CPU probe measured 42 GFLOP/s with 2 threads against 75 with 1")
        assert "(load average 1.5)" in warning
        assert warning.endswith("Using 1 thread; pass --threads N to choose")
    finally:
        torch.set_num_threads(before)


def test_the_int8_screen_is_used_only_where_int8_matmuls_are_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch._int_mm`` runs on every x86 CPU but without VNNI it is slower than fp32 (18x on an AVX2-only
    Zen 3): the decoder's int8 screen is chosen by the measured speed-up, not by whether it runs."""
    from calm import hardware
    from calm.checkpoint import fast_argmax_screens

    probe = hardware._cpu_int8_speedup.__wrapped__
    monkeypatch.setattr(hardware, "_cpu_int_mm_works", lambda: True)
    monkeypatch.setattr(hardware, "_cpu_int8_speedup", lambda: 0.05)
    assert hardware.int8_matmul_available("cpu") and not hardware.int8_matmul_is_fast("cpu")
    assert not fast_argmax_screens(torch.device("cpu")).int8
    monkeypatch.setattr(hardware, "_cpu_int8_speedup", lambda: 4.0)
    assert hardware.int8_matmul_is_fast("cpu") and fast_argmax_screens(torch.device("cpu")).int8
    assert not hardware.int8_matmul_is_fast("meta")
    assert probe() > 0  # the real probe runs and measures something
