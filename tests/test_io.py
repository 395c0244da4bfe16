"""Every JSON the project writes is strict JSON: no ``NaN`` / ``Infinity``, ``null`` with a reason.

Checked three ways: every ``json.dump(s)`` call in the code goes through ``calm.io`` or refuses
non-finite numbers; the producer of undefined values (BrierLM standard errors) returns None with
a reason; and the files and lines that real runs write parse with a strict parser.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from calm.cli import main
from calm.eval.brierlm import BrierAccumulator
from calm.io import finite_or_none, to_json

ROOT = Path(__file__).resolve().parent.parent


def strict_loads(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_writer_refuses_non_finite_numbers() -> None:
    offenders = []
    for path in sorted([*(ROOT / "calm").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
        if path.name == "jsonio.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            func = getattr(node, "func", None)
            if (
                isinstance(node, ast.Call)
                and isinstance(func, ast.Attribute)
                and func.attr in ("dump", "dumps")
                and getattr(func.value, "id", None) == "json"
            ):
                strict = any(
                    k.arg == "allow_nan" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in node.keywords
                )
                if not strict:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"use calm.io.to_json (or allow_nan=False) at {offenders}"


def test_to_json_writes_null_for_every_non_finite_float() -> None:
    obj = {
        "nan": math.nan,
        "inf": [math.inf, -math.inf, 1.5],
        "np": np.float32("nan"),
        "t": torch.tensor(float("inf")),
        "nested": ({"x": np.float64("-inf")},),
        "ok": np.float32(0.25),
        "int": 3,
    }
    assert strict_loads(to_json(obj)) == {
        "nan": None,
        "inf": [None, None, 1.5],
        "np": None,
        "t": None,
        "nested": [{"x": None}],
        "ok": 0.25,
        "int": 3,
    }
    assert finite_or_none("text") == "text"


@pytest.mark.parametrize(
    "case,blocks,undefined",
    [
        ("brierlm_zero", [torch.tensor([[0.5, 0.2, 0.1, -0.3], [0.4, 0.1, 0.0, -0.1]])] * 12, {"brierlm_se"}),
        ("one_block", [torch.tensor([[0.5, 0.2, 0.1, 0.1], [0.4, 0.1, 0.2, 0.05]])], {"brierlm_se_clustered"}),
        ("one_position", [torch.tensor([[0.5, 0.2, 0.1, 0.1]])], {"brier1_se", "brierlm_se", "brierlm_se_iid"}),
    ],
)
def test_undefined_standard_errors_are_null_with_a_reason(case, blocks, undefined) -> None:
    acc = BrierAccumulator()
    for block in blocks:
        acc.add(block)
    summary = acc.summary()
    parsed = strict_loads(to_json(summary))
    assert undefined <= {k for k, v in parsed.items() if v is None}
    assert undefined <= set(parsed["undefined"]) and all(parsed["undefined"][k] for k in undefined)
    if case == "brierlm_zero":
        assert parsed["brierlm"] == 0 and "Brier-n <= 0" in parsed["undefined"]["brierlm_se"]
        assert parsed["brierlm_se_iid"] is None and parsed["brier1_se"] is not None
    # everything that is not None is a finite number or a plain value
    assert all(v is None or not isinstance(v, float) or math.isfinite(v) for v in parsed.values())


def test_files_written_by_real_runs_are_strict_json(data_dir: Path, tmp_path: Path, capsys) -> None:
    """Train a tiny GPT, evaluate it on one block (one cluster: the clustered SE is undefined, which
    was written as NaN before), and parse every JSON file and line the run and the commands wrote."""
    run = tmp_path / "gpt"
    lm = ["--set", "model.hidden_size=32", "--set", "model.intermediate_size=64", "--set", "model.num_layers=2"]
    lm += ["--set", "model.num_heads=4", "--set", "model.max_seq_len=32", "--set", "train.block_size=16"]
    fast = ["--precision", "fp32", "--max-steps", "2", "--batch-tokens", "64", "--no-progress"]
    fast += ["--set", "train.eval_tokens=64", "--set", "train.log_every=1"]
    assert main(["train-gpt", "--data", str(data_dir), "--out", str(run), *lm, *fast]) == 0
    out = tmp_path / "eval.json"
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(run), "--data", str(data_dir), "--json", str(out), "--context-tokens", "16"]
    assert main([*argv, "--max-blocks", "1", "--no-progress"]) == 0
    assert "nan" not in capsys.readouterr().out.lower()
    result = strict_loads(out.read_text())
    assert result["brierlm_se_clustered"] is None and "brierlm_se_clustered" in result["undefined"]
    assert main(["flops", "--model", "calm", "--preset", "S", "--json"]) == 0
    strict_loads(capsys.readouterr().out)
    files = [p for p in [*run.rglob("*.json"), *data_dir.rglob("*.json")]]
    assert len(files) >= 4
    for path in files:
        strict_loads(path.read_text())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict_loads(line)
