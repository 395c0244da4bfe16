"""Smoke tests of ``calm bench``: the JSON it prints has the promised keys and sane numbers.

Tiny models and a handful of tokens, so the timings themselves mean nothing here; the tests check
the structure (which `benchmarks/README.md` documents) and that every ratio, speed and MFU is a
positive finite number.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from calm.bench import timed_calls
from calm.cli import main


def _positive(x: object) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_bench_generate_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "generate", "--sizes", "tiny", "--prompt-tokens", "8", "--new-tokens", "16"]
    argv += ["--repeats", "1", "--warmup", "0", "--num-samples", "8", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"tiny", "device", "torch", "threads"} <= set(result)
    tiny = result["tiny"]
    for key in ("greedy_ratio", "t_half_ratio", "calm_greedy_tok_s", "gpt_greedy_tok_s"):
        assert _positive(tiny[key]), key
    assert _positive(tiny["calm_t_half_tok_s"]) and _positive(tiny["gpt_t_half_tok_s"])
    assert tiny["greedy_ratio"] == pytest.approx(tiny["calm_greedy_tok_s"] / tiny["gpt_greedy_tok_s"])
    assert _positive(tiny["greedy_ratio_paired"]) and _positive(tiny["t_half_ratio_paired"])
    assert tiny["setup"]["vocab_size"] == 4096 and tiny["setup"]["new_tokens"] == 16
    profile = tiny["profile"]
    assert set(profile) == {"calm_greedy", "calm_t_half", "gpt_greedy", "gpt_t_half"}
    calm = profile["calm_t_half"]
    assert set(calm["ms_per_step"]) == {"backbone", "head", "ae_decoder", "sampler_other"}
    assert sum(calm["fraction"].values()) == pytest.approx(1.0, abs=1e-3)
    assert calm["steps"] == 16 // 4
    assert set(profile["gpt_greedy"]["ms_per_token"]) == {"backbone", "lm_head", "sampler_other"}
    assert profile["gpt_greedy"]["tokens"] == 16
    assert 1 <= tiny["distinct_of_n_candidates"] <= 8
    assert tiny["output_check"]["greedy_same_samples"] is True and tiny["output_check"]["t_half_same_samples"] is True
    assert tiny["precision"]["dtype"] == "float32" and isinstance(tiny["precision"]["bf16_native"], bool)
    assert calm["detail"]["vocab_argmax_rows_per_step"] > 0
    # the tiny GPT streams its blocks and 4k LM head per token; CALM its whole step per 4 tokens
    assert tiny["weight_bytes_per_token"]["gpt"] > tiny["weight_bytes_per_token"]["calm"] > 0


@pytest.mark.parametrize("bf16_fast", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_bench_train_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, bf16_fast: bool) -> None:
    from calm import hardware as precision

    probe = precision.Probe(native_bf16=bf16_fast, fp32_gflops=50.0, bf16_gflops=200.0 if bf16_fast else None)
    monkeypatch.setattr(precision, "cpu_probe", lambda: probe)
    argv = ["bench", "train", "--sizes", "tiny", "--steps", "1", "--context", "16", "--batch-tokens", "128"]
    argv += ["--peak-size", "256", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    timed = {"fp32", "bf16"} if bf16_fast else {"fp32"}  # emulated bf16 is not timed by default
    assert set(result["peak_flops"]) == timed and all(_positive(v) for v in result["peak_flops"].values())
    assert result["precision_auto"] == ("bf16" if bf16_fast else "fp32")
    assert result["precision_probe"]["native_bf16"] == bf16_fast
    for kind in ("calm", "gpt"):
        entry = result["tiny"][kind]
        assert _positive(entry["tokens_per_s"]) and _positive(entry["mfu"])
        assert entry["precision"] in timed
        assert set(entry["by_precision"]) == timed
    assert result["tiny"]["calm"]["block_tokens"] == 64 and result["tiny"]["gpt"]["block_tokens"] == 16


def test_bench_train_rejects_a_batch_that_does_not_divide(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "train", "--sizes", "tiny", "--steps", "1", "--context", "16", "--batch-tokens", "100"]
    assert main(argv) == 2
    assert "multiple" in capsys.readouterr().err


def test_timed_calls_restores_the_methods() -> None:
    class Thing:
        def work(self, x: int) -> int:
            return 2 * x

    thing = Thing()
    with timed_calls([(thing, "work", "work")], device=torch.device("cpu")) as calls:
        assert thing.work(3) == 6 and thing.work(4) == 8
    assert len(calls["work"]) == 2 and all(t >= 0 for t in calls["work"])
    assert "work" not in vars(thing) and thing.work(5) == 10


@pytest.mark.parametrize("anchored", [False, True])
def test_profile_calm_times_the_head_once_per_step_for_plain_and_anchored_heads(anchored: bool) -> None:
    import factories

    from calm.bench.generate import profile_calm

    extra = {"token_anchor": True, "token_aux_weight": 0.3} if anchored else {}
    model = factories.tiny_calm(vocab=50, **extra).eval()
    prompt = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 0.5):
        out = profile_calm(model, prompt, new_tokens=16, temperature=temperature, num_samples=8)
        assert out["steps"] == 4 and out["ms_per_step"]["head"] > 0  # 16 new tokens = 4 steps of K = 4
