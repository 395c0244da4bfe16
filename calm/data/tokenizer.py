"""A thin layer over Hugging Face ``tokenizers``: load, train, and rebuild the paper's tokenizer.

Paper §7.1 (tokenizer). The paper uses the Llama-3 tokenizer, and the authors' code appends a
``[PAD]`` token, so ``vocab_size = 128,257``; BOS ``<|begin_of_text|>`` is prepended to every document, EOS
``<|end_of_text|>`` ends each document in the autoencoder's packing. ``llama3_tokenizer`` rebuilds
exactly that tokenizer from a public PyPI wheel; ``train_bpe`` trains a small byte-level BPE for
laptop-scale runs (a 128k vocabulary is far too large for a few MB of text: most ids would never be
seen in training).

The class does no special-token insertion: ``encode`` returns the plain ids of the text and the
data pipeline (``calm.data.shards``) adds BOS/EOS/PAD where the authors' code does. Text that
happens to contain a special token's spelling (``<|bos|>``) is encoded as that special token, as Hugging Face does.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import struct
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from calm.data.corpus import PinnedPackage, cache_dir, fetch_package
from calm.io import atomic_write_text

BOS_NAMES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("<|eos|>", "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
PAD_NAMES = ("<|pad|>", "[PAD]", "<pad>", "<|padding|>")
PAD_ADDED = "[PAD]"
"""Appended when a tokenizer has no pad token, like the official training scripts."""

TRAINED_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
"""Special tokens of ``train_bpe``, at ids 0, 1, 2 (the trainer places them first)."""

LLAMA3_PACKAGE = PinnedPackage(
    "quicktok-v1",
    "0.4.0",
    "quicktok_v1-0.4.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "e2a85a1f5f9a73f773c66e8c2419ffbb6f6add30464b83064870f5ea3e35c99b",
    # Pin one wheel so every platform and Python fetches the same file; only its data is read.
    pip_args=(
        "--only-binary=:all:",
        "--platform=manylinux2014_x86_64",
        "--python-version=3.11",
        "--implementation=cp",
        "--abi=cp311",
    ),
)
LLAMA3_TIKTOKEN_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
"""sha256 of Meta's ``tokenizer.model`` (tiktoken text format) for Llama 3."""
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_VOCAB_SIZE = 128_257


class TokenizerError(ValueError):
    """A tokenizer is missing, malformed or lacks a required token; the message says how to fix it."""


def _find_token(tk: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = tk.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids CALM needs (BOS, EOS, PAD) and a content hash."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, name: str = "tokenizer") -> None:
        self._tk = tokenizer
        self.name = name
        bos = _find_token(tokenizer, BOS_NAMES)
        eos = _find_token(tokenizer, EOS_NAMES)
        for what, found, names in (("BOS", bos, BOS_NAMES), ("EOS", eos, EOS_NAMES)):
            if found is None:
                raise TokenizerError(
                    f"tokenizer {name!r} has no {what} token; looked for {', '.join(names)}. "
                    f"Add one of them as a special token to its tokenizer.json"
                )
        pad = _find_token(tokenizer, PAD_NAMES)
        if pad is None:
            tokenizer.add_special_tokens([AddedToken(PAD_ADDED, special=True, normalized=False)])
            pad = tokenizer.token_to_id(PAD_ADDED)
        self._bos, self._eos, self._pad = int(bos), int(eos), int(pad)  # type: ignore[arg-type]

    # construction / serialisation ------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> Tokenizer:
        path = Path(path)
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"cannot load tokenizer from {path}: {e}; is it a tokenizer.json?") from None
        return cls(tk, name or str(path))

    @classmethod
    def from_str(cls, text: str, name: str = "tokenizer") -> Tokenizer:
        try:
            tk = tokenizers.Tokenizer.from_str(text)
        except Exception as e:
            raise TokenizerError(f"cannot parse tokenizer JSON: {e}") from None
        return cls(tk, name)

    def to_str(self) -> str:
        return self._tk.to_str()

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (``calm.io.atomic_write_text``)."""
        atomic_write_text(path, self.to_str())

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the canonical JSON (sorted keys, compact): equal for equal tokenizers."""
        canonical = json.dumps(
            json.loads(self.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # ids ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (an embedding needs this many rows)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tk

    # text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; no BOS/EOS is added."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for many texts, in parallel threads."""
        fast = getattr(self._tk, "encode_batch_fast", None)  # skips offsets (tokenizers >= 0.21)
        encodings = (fast or self._tk.encode_batch)(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ``decode(encode(text)) == text`` for any text."""
        return self._tk.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


# ----------------------------------------------------------------------------------------------
# Byte-level BPE training


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer) on ``texts``, streamed.

    All 256 byte symbols are in the initial alphabet, so any text encodes and round-trips exactly.
    The special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` get ids 0, 1, 2 (the ``tokenizers``
    trainer always places special tokens first). A corpus too small to support ``vocab_size``
    merges yields a smaller vocabulary; ``Tokenizer.vocab_size`` reports the real size.
    """
    minimum = 256 + len(TRAINED_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {minimum}")
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(TRAINED_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk, name=f"bpe-{tk.get_vocab_size(with_added_tokens=True)}")


# ----------------------------------------------------------------------------------------------
# Llama 3


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by the ByteLevel pre-tokenizer."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _read_quicktok(wheel: Path) -> tuple[dict[bytes, int], dict[int, str]]:
    """Ranks and special tokens from quicktok's ``llama3.vocab`` / ``llama3.special`` (little-endian).

    vocab: u32 count, then per entry u16 length, token bytes, u32 rank.
    special: u32 count, then per entry u32 id, u16 length, UTF-8 name.
    """
    try:
        with zipfile.ZipFile(wheel) as z:
            vocab, special = z.read("quicktok/data/llama3.vocab"), z.read("quicktok/data/llama3.special")
    except (zipfile.BadZipFile, KeyError) as e:
        raise TokenizerError(f"{wheel} is not the expected quicktok wheel ({e}); delete it and retry") from None
    ranks: dict[bytes, int] = {}
    (count,) = struct.unpack_from("<I", vocab, 0)
    pos = 4
    for _ in range(count):
        (length,) = struct.unpack_from("<H", vocab, pos)
        token = vocab[pos + 2 : pos + 2 + length]
        (rank,) = struct.unpack_from("<I", vocab, pos + 2 + length)
        ranks[token] = rank
        pos += 2 + length + 4
    specials: dict[int, str] = {}
    (count,) = struct.unpack_from("<I", special, 0)
    pos = 4
    for _ in range(count):
        token_id, length = struct.unpack_from("<IH", special, pos)
        specials[token_id] = special[pos + 6 : pos + 6 + length].decode("utf-8")
        pos += 6 + length
    if pos != len(special) or len(ranks) != 128_000:
        raise TokenizerError(f"unexpected layout of the Llama-3 tables in {wheel}; delete it and retry")
    return ranks, specials


def _tiktoken_text(ranks: dict[bytes, int]) -> bytes:
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in by_rank)


def _llama3_json(ranks: dict[bytes, int], specials: dict[int, str]) -> tokenizers.Tokenizer:
    """A Hugging Face BPE equivalent to tiktoken's encoding with these ranks.

    Merges are recovered the way ``transformers`` converts tiktoken files (and as in Meta's
    published tokenizer.json, 280,147 merges): for every multi-byte token, every split into two
    tokens of the vocabulary is a merge, ordered by the rank of the result. One canonical merge per
    token is not enough: some tokens (e.g. ``b'.:.:'``) are never produced by merging their bytes,
    yet tiktoken (and ``ignore_merges=True`` here) emits them when a whole pre-token matches.
    """
    to_unicode = _bytes_to_unicode()

    def encode(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {encode(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(encode(a), encode(b)) for *_, a, b in merges], ignore_merges=True)
    tk = tokenizers.Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    tk.add_special_tokens([AddedToken(PAD_ADDED, special=True, normalized=False)])
    return tk


def llama3_tokenizer(cache: Path | str | None = None) -> Tokenizer:
    """The paper's tokenizer: Llama 3 (128,256 ids) plus ``[PAD]`` = 128,257 ids.

    Rebuilt from the PyPI wheel ``quicktok-v1==0.4.0``, checked against the sha256 of Meta's
    ``tokenizer.model``, and cached as ``<cache>/tokenizers/llama3.json``. Its vocabulary is under
    the Meta Llama 3 Community License.
    """
    path = cache_dir(cache) / "tokenizers" / "llama3.json"
    if path.is_file():
        try:
            tok = Tokenizer.from_file(path, name="llama3")
            if tok.vocab_size == LLAMA3_VOCAB_SIZE:
                return tok
        except TokenizerError:
            pass  # a damaged cache entry: rebuild it
    ranks, specials = _read_quicktok(fetch_package(LLAMA3_PACKAGE, cache))
    digest = hashlib.sha256(_tiktoken_text(ranks)).hexdigest()
    if digest != LLAMA3_TIKTOKEN_SHA256:
        raise TokenizerError(
            f"the Llama-3 ranks rebuilt from {LLAMA3_PACKAGE.filename} hash to {digest}, expected "
            f"{LLAMA3_TIKTOKEN_SHA256} (Meta's tokenizer.model); the wheel's data changed. "
            "Pass a tokenizer.json path instead"
        )
    tok = Tokenizer(_llama3_json(ranks, specials), name="llama3")
    if (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) != (LLAMA3_VOCAB_SIZE, 128000, 128001, 128256):
        raise TokenizerError(f"rebuilt Llama-3 tokenizer is inconsistent: {tok}")
    tok.save(path)
    return tok


def load_tokenizer(spec: str | Path, cache: Path | str | None = None) -> Tokenizer:
    """``llama3``, a tokenizer.json, or a folder holding one (a prepared data dir, a checkpoint), or a
    training run directory (the tokenizer of its newest checkpoint)."""
    if str(spec) == "llama3":
        return llama3_tokenizer(cache)
    path = Path(spec)
    if path.is_dir():
        in_run = sorted((path / "checkpoints").glob("step_*/tokenizer.json"))
        path = path / "tokenizer.json" if (path / "tokenizer.json").exists() or not in_run else in_run[-1]
    if not path.is_file():
        raise TokenizerError(
            f"no tokenizer at {path}; pass 'llama3' or the path of a tokenizer.json (or a folder holding one)"
        )
    return Tokenizer.from_file(path)
