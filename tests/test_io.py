"""``calm.io``: files are written whole or not at all, and every JSON the project writes is strict JSON.

Atomic writes: a file or a directory is replaced whole; a failed write names the file and leaves no
temporary file; a crash at any point of a directory replacement leaves the old or the new directory,
and ``recover_directories`` clears the rest. Every rename and temporary file of the package goes
through ``calm.io``.

Strict JSON, checked three ways: every ``json.dump(s)`` call in the code goes through ``calm.io`` or
refuses non-finite numbers; the producer of undefined values (BrierLM standard errors) returns None
with a reason; and the files and lines that real runs write parse with a strict parser. JSON lines:
a last line cut short is skipped with a warning, a damaged line before it is an error naming it.
"""

from __future__ import annotations

import ast
import errno
import json
import math
import os
import re
import shutil
import stat
from pathlib import Path

import factories
import numpy as np
import pytest
import torch

from calm.cli import main
from calm.eval.brierlm import BrierAccumulator
from calm.io import (
    JSONFileError,
    append_jsonl,
    atomic_directory,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    finite_or_none,
    read_json,
    read_jsonl,
    recover_directories,
    remove_directory,
    to_json,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent


def strict_loads(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_writer_refuses_non_finite_numbers() -> None:
    offenders = []
    for path in sorted([*(ROOT / "calm").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]):
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
    lm = [*factories.set_args(factories.dotted("model", factories.TINY_GPT)), "--set", "train.block_size=16"]
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


# ------------------------------------------------------------------------------------------------
# Atomic files: whole or absent, with the user's permissions, and an error that names the file


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_writes_replace_the_file_whole_and_leave_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.txt"  # parents are created
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "zweite Zeile é\r\n")  # UTF-8, newlines as given
    assert path.read_bytes() == "zweite Zeile é\r\n".encode()
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # not tempfile's 0o600
    assert _hidden(path.parent) == []


def test_a_failed_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match=f"could not write {path}: No space left on device") as info:
        atomic_write_text(path, "new")
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_text() == "old" and _hidden(tmp_path) == []

    with pytest.raises(ZeroDivisionError), atomic_file(path) as tmp:  # a writer's own error passes unchanged
        tmp.write_text("half")
        _ = 1 / 0
    assert path.read_text() == "old" and _hidden(tmp_path) == []


def test_atomic_file_gives_writers_that_need_a_name_a_temporary_path(tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    with atomic_file(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tokens.bin.tmp-") and tmp.exists()
        assert not path.exists()
        array = np.memmap(tmp, dtype=np.uint32, mode="w+", shape=(3,))
        array[:] = [1, 2, 3]
        array.flush()
        del array
    assert np.fromfile(path, dtype=np.uint32).tolist() == [1, 2, 3] and _hidden(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Atomic directories: a crash at any point leaves the old or the new directory, whole


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


OLD_TREE = {"a.txt": "old a", "b.txt": "old b"}
NEW_TREE = {"a.txt": "new a", "c/d.txt": "new d"}


def _make(path: Path, tree: dict[str, str]) -> None:
    for name, text in tree.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)


def test_atomic_directory_replaces_a_directory_or_leaves_it(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        assert tmp.name.startswith(".ckpt.tmp-") and not target.exists()
        _make(tmp, OLD_TREE)
    assert _tree(target) == OLD_TREE
    with pytest.raises(RuntimeError, match="disk"), atomic_directory(target) as tmp:
        _make(tmp, NEW_TREE)
        raise RuntimeError("disk")
    assert _tree(target) == OLD_TREE and _hidden(tmp_path) == []
    with atomic_directory(target) as tmp:
        _make(tmp, NEW_TREE)
    assert _tree(target) == NEW_TREE and _hidden(tmp_path) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()  # not tempfile's 0o700


class Crash(BaseException):
    """The process dies: nothing after it happens on disk (not even cleanup handlers)."""


def _crash_after(monkeypatch, operations: int) -> None:
    """Let ``operations`` renames / tree deletions happen, then crash in the next one (a tree deletion
    crashes half-way: one file deleted) and stay dead."""
    real_replace, real_rmtree = os.replace, shutil.rmtree
    state = {"left": operations, "dead": False}

    def step() -> bool:
        if state["dead"]:
            raise Crash
        state["left"] -= 1
        state["dead"] = state["left"] < 0
        return state["dead"]

    def replace(src, dst):
        if step():
            raise Crash
        real_replace(src, dst)

    def rmtree(path, ignore_errors=False):
        if state["dead"]:
            return  # a cleanup handler of the dead process: does nothing
        if step():
            next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
            raise Crash
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


@pytest.mark.parametrize("existing", [True, False])
def test_a_crash_at_any_point_of_a_replacement_leaves_the_old_or_the_new_directory(
    tmp_path: Path, monkeypatch, existing: bool
) -> None:
    outcomes = set()
    for operations in range(6):
        root = tmp_path / f"crash{operations}"
        root.mkdir()
        target = root / "step_00000010"
        if existing:
            _make(target, OLD_TREE)
            target.mkdir(exist_ok=True)
        (root / "step_00000005").mkdir()  # another complete entry: never touched
        _crash_after(monkeypatch, operations)
        crashed = True
        try:
            with atomic_directory(target) as tmp:
                _make(tmp, NEW_TREE)
            crashed = False
        except Crash:
            pass
        monkeypatch.undo()
        recover_directories(root)
        tree = _tree(target) if target.exists() else None
        assert tree in (OLD_TREE if existing else None, NEW_TREE), (operations, tree)
        assert sorted(p.name for p in root.iterdir()) == ["step_00000005", "step_00000010"][: 1 + (tree is not None)]
        outcomes.add((crashed, tree == NEW_TREE))
    assert (False, True) in outcomes and (True, False) in outcomes  # it did finish, and did crash early
    if existing:
        assert (True, True) in outcomes  # a crash after the swap: the new one stays


def test_recover_directories_restores_a_moved_aside_directory_only_when_complete(tmp_path: Path) -> None:
    for name, tree in ((".a.old-1", OLD_TREE), (".b.old-1", {"partial": ""}), (".c.tmp-1", NEW_TREE)):
        (tmp_path / name).mkdir()
        _make(tmp_path / name, tree)
    (tmp_path / ".d.json.tmp-1").write_text("{")  # an interrupted atomic_write_text
    (tmp_path / ".keep").write_text("not ours")
    (tmp_path / "e").mkdir()
    recover_directories(tmp_path, is_complete=lambda p: (p / "a.txt").exists())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "a", "e"]
    assert _tree(tmp_path / "a") == OLD_TREE
    remove_directory(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "e"]


# ------------------------------------------------------------------------------------------------
# JSON files and JSON lines


def test_write_json_is_strict_and_read_json_names_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "DONE.json"
    write_json(path, {"b": math.nan, "a": (1, 2)}, sort_keys=True)
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": null\n}\n'
    assert read_json(path) == {"a": [1, 2], "b": None}
    path.write_text('{"a": 1,')
    with pytest.raises(JSONFileError, match=rf"{path} is not valid JSON \(.* at line 1 column 9\); .*write it again"):
        read_json(path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(JSONFileError, match=f"{path} is not UTF-8"):
        read_json(path)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_read_jsonl_skips_a_torn_last_line_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        append_jsonl(path, {"step": step, "loss": math.inf})
    assert read_jsonl(path) == [{"step": 1, "loss": None}, {"step": 2, "loss": None}]
    with open(path, "a") as f:
        f.write('\n{"step": 3, "lo')  # a blank line, then an append cut short
    with pytest.warns(UserWarning, match=rf"{path}: skipped its last line \(4\), which is cut short"):
        assert [r["step"] for r in read_jsonl(path)] == [1, 2]


@pytest.mark.parametrize(
    "damaged,message",
    [('{"step": 2', r":2 is not valid JSON \("), ("[2]", r":2 holds a JSON list, not an object")],
)
def test_read_jsonl_refuses_a_damaged_line_before_the_last_naming_it(tmp_path: Path, damaged, message) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 1}}\n{damaged}\n{{"step": 3}}\n')
    with pytest.raises(JSONFileError, match=re.escape(str(path)) + message + ".*repair or delete that line"):
        read_jsonl(path)


def test_every_rename_and_temporary_file_goes_through_calm_io() -> None:
    """Atomic writes are implemented once: no other module renames files into place or makes temporary
    files and directories of its own (a download moved into the cache is checked by its sha256)."""
    allowed = {("calm/data/corpus.py", "replace")}
    offenders = []
    for path in sorted((ROOT / "calm").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == "calm/io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(func, ast.Attribute):
                owner = getattr(func.value, "id", None)
                banned = (owner == "os" and func.attr in ("replace", "rename")) or (
                    owner == "tempfile" and func.attr in ("mkstemp", "mkdtemp", "NamedTemporaryFile")
                )
                if banned and (rel, func.attr) not in allowed:
                    offenders.append(f"{rel}:{node.lineno} {owner}.{func.attr}")
    assert not offenders, f"write through calm.io (atomic_file, atomic_directory, ...) at {offenders}"
