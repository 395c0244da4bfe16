"""The report's verdict (``calm.experiments.verdict``): ratios only where they exist, scoring checked, not assumed."""

from __future__ import annotations

from typing import Any

import pytest

from calm.experiments.verdict import brier_ratios, verdict_lines


def _eval(brier: list[float], se: list[float], sums: list[list[float]], context: int = 256) -> dict[str, Any]:
    return {
        **{f"brier{n}": b for n, b in enumerate(brier, start=1)},
        **{f"brier{n}_se": s for n, s in enumerate(se, start=1)},
        "per_block": {"sums": sums, "positions": [10] * len(sums)},
        "context": {"tokens": context},
        "data": "test.jsonl.gz",
        "tokens": context * len(sums),
        "blocks": len(sums),
    }


GPT = _eval([6.0, 1.0, 0.01, -0.01], [0.2, 0.05, 0.02, 0.01], [[0.6, 0.1, 0.0, 0.0], [0.6, 0.1, 0.0, 0.0]])
CALM = _eval([3.0, 0.5, 0.0, 0.0], [0.2, 0.05, 0.02, 0.01], [[0.3, 0.05, 0.0, 0.0], [0.3, 0.05, 0.0, 0.0]])


def _row(run: str, kind: str, **kw: Any) -> dict[str, Any]:
    return {"run": run, "model": run.upper(), "kind": kind, "anchored": False, "lm_train_flops": 1.6e13,
            "ae_train_flops": 1.8e13 if kind == "calm" else None, "inference_flops_per_token": 1e7, **kw}  # fmt: skip


def test_ratios_exist_only_where_the_reference_is_clearly_above_zero() -> None:
    ratios = brier_ratios(CALM, GPT)
    assert [r["ratio"] for r in ratios[:2]] == pytest.approx([0.5, 0.5])
    assert ratios[0]["paired"] and ratios[0]["se"] == pytest.approx(0.0)
    assert "not clearly above 0" in ratios[2]["none"] and "not clearly above 0" in ratios[3]["none"]


def test_verdict_states_compute_context_seeds_and_the_autoencoder() -> None:
    rows = [_row("calm", "calm"), _row("gpt", "gpt")]
    text = "\n".join(verdict_lines(rows, {"calm": CALM, "gpt": GPT}, {"calm": 200.0, "gpt": 100.0}))
    assert "one seed" in text and "every model with 256 tokens of context" in text
    assert "Brier-1 0.50× ± 0.00" in text
    assert "no ratio for Brier-3, Brier-4 (the GPT's Brier-n is not clearly above 0: 0.01" in text
    assert "3.4e+13 FLOPs, 2.12× the GPT's" in text  # LM + autoencoder training against the GPT's
    assert "next-vector prediction" in text and "orders of magnitude smaller" in text
    assert "2.00× the GPT's tokens/s" in text


def test_verdict_says_when_models_were_not_scored_alike() -> None:
    calm = {**CALM, "context": {"tokens": 1024}, "tokens": 2048}
    rows = [_row("calm", "calm", anchored=True), _row("gpt", "gpt")]
    text = "\n".join(verdict_lines(rows, {"calm": calm, "gpt": GPT}, {}))
    assert "NOT scored alike" in text and "CALM 1024, GPT 256" in text
    assert "readout" in text  # an anchored model's Brier-1 is named for what it scores
