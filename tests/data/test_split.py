"""A user's own small corpus gets a usable validation split at prepare time (``calm.data.split``).

One plain-text file is one document, and a few JSONL documents at val_fraction 1% put nothing in
validation by hash; every training stage needs validation text. ``prepare`` tops the split up
(whole documents, else the tail of the longest one), says so in its summary line, and refuses
only a corpus too small for any split. Each method of the plan is exercised here.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from conftest import make_texts

from calm.cli import main
from calm.data.prepare import prepare
from calm.data.shards import TokenShard, ae_chunks, lm_blocks
from calm.data.split import MAX_HOLDOUT, plan_split
from calm.data.tokenizer import Tokenizer


def _book(words: int) -> str:
    text, i = "", 0
    while len(text.split()) < words:
        text += make_texts(num_docs=50, seed=i)[i % 50].replace(" = Document", " Chapter")
        i += 1
    return " ".join(text.split()[:words]) + "\n"


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _texts(data: Path, split: str) -> list[str]:
    tok = Tokenizer.from_file(data / "tokenizer.json")
    shard = TokenShard(data, split)
    return [tok.decode(shard.document(i)[1:]) for i in range(shard.num_documents)]


def test_a_single_text_file_gets_its_tail_held_out_and_trains(tmp_path: Path, capsys) -> None:
    book = tmp_path / "book.txt"
    book.write_text(_book(6_700))
    data = tmp_path / "data"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw Python warning on the way
        argv = ["prepare", "--out", str(data), "--corpus", str(book), "--vocab-size", "1024", "--no-progress"]
        code, out, err = _run(argv, capsys)
    assert code == 0 and err == "", err
    assert "held out the last" in out and "of the longest document" in out
    meta = json.loads((data / "meta.json").read_text())
    assert meta["validation"]["method"] == "tail"
    val_bytes = meta["splits"]["val"]["num_bytes"]
    assert 0.15 * book.stat().st_size <= val_bytes <= 0.5 * book.stat().st_size
    (head,), (tail,) = _texts(data, "train"), _texts(data, "val")
    assert head + tail == book.read_text()  # nothing lost, cut between words
    assert head[-1] != " " and tail[0] == " "
    val = TokenShard(data, "val")
    assert len(lm_blocks(val, 1024)) >= 1 and len(ae_chunks(val, 4)) >= 1  # one block of the tiny CALM preset
    tiny = ["--max-steps", "1", "--precision", "fp32", "--no-progress", "--set", "train.eval_tokens=256"]
    lm = ["--set", "model.hidden_size=32", "--set", "model.intermediate_size=64", "--set", "model.num_layers=2"]
    code, _, err = _run(["train-gpt", "--data", str(data), "--out", str(tmp_path / "gpt"), *tiny, *lm], capsys)
    assert code == 0, err
    code, _, err = _run(["train-ae", "--data", str(data), "--out", str(tmp_path / "ae"), *tiny], capsys)
    assert code == 0, err


def test_a_few_documents_move_whole_documents_to_validation(tmp_path: Path, capsys) -> None:
    docs = [_book(300 + 20 * i) for i in range(31)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = tmp_path / "data"
    argv = ["prepare", "--out", str(data), "--corpus", str(corpus), "--vocab-size", "512", "--no-progress"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "moved" in out and "whole documents" in out
    meta = json.loads((data / "meta.json").read_text())
    assert meta["validation"]["method"] == "documents"
    assert meta["validation"]["hash_val_bytes"] < meta["validation"]["min_val_bytes"]
    val_texts = _texts(data, "val")
    assert val_texts and set(val_texts) <= set(docs)  # whole documents, none split
    assert sorted(val_texts + _texts(data, "train")) == sorted(docs)
    floor = meta["validation"]["min_val_bytes"]
    assert floor <= meta["splits"]["val"]["num_bytes"] <= 1.5 * floor


def test_a_corpus_too_small_for_any_split_is_refused_at_prepare_time(tmp_path: Path, capsys) -> None:
    small = tmp_path / "small.txt"
    small.write_text(_book(150))
    argv = ["prepare", "--out", str(tmp_path / "d"), "--corpus", str(small), "--vocab-size", "300", "--no-progress"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.startswith("error: ") and "too little to hold out a validation split" in err
    assert "--val-fraction 0" in err and not (tmp_path / "d").exists()
    code, out, err = _run([*argv, "--val-fraction", "0"], capsys)
    assert code == 0 and "no validation split" in out


def test_a_large_enough_hash_split_is_left_alone(tmp_path: Path, tiny_corpus: Path) -> None:
    meta = prepare(tmp_path / "d", [str(tiny_corpus)], vocab_size=300, val_fraction=0.5, progress=False)
    assert meta["validation"]["method"] == "hash"


def test_plan_covers_every_method() -> None:
    texts = {0: "word " * 800, 1: "word " * 800, 2: "word " * 8000}  # 4 kB, 4 kB, 40 kB
    sizes = [(f"k{i}", len(t)) for i, t in texts.items()]
    plan = plan_split(
        sizes[::2], seed=0, val_fraction=1e-9, min_val_bytes=9000, text_of=[texts[0], texts[2]].__getitem__
    )
    assert plan.info["method"] == "tail" and plan.moved == {0}  # the 4 kB document, then a tail of the big one
    assert plan.cut[0] == 1 and plan.info["val_bytes"] >= plan.info["min_val_bytes"] == 8800
    plan = plan_split(sizes, seed=0, val_fraction=1e-9, min_val_bytes=6000, text_of=texts.__getitem__)
    assert plan.info["method"] == "documents" and plan.moved == {0, 1} and plan.cut is None
    assert plan_split(sizes, 0, 0.0).info["method"] == "none"
    # the minimum is never more than a fifth of the corpus
    plan = plan_split(sizes, seed=0, val_fraction=1e-9, text_of=texts.__getitem__)
    assert plan.info["min_val_bytes"] == min(16_384, int(MAX_HOLDOUT * 48_000))


def test_warnings_print_as_messages(monkeypatch, capsys) -> None:
    import calm.cli

    def warns(args) -> int:
        warnings.warn("something to know", stacklevel=1)
        return 0

    monkeypatch.setattr(calm.cli, "cmd_report", warns)
    code, _, err = _run(["report", "--run", "x"], capsys)
    assert code == 0 and err == "warning: something to know\n"
