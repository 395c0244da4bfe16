"""Text -> token shards (uint32 memmaps) -> training items and batches.

Paper §7.1 and the authors' code (packing). ``prepare`` tokenizes a corpus once into a self-contained folder:

    train.bin / val.bin   uint32 token ids; each document stored as [BOS] + tokens (no EOS)
    train.idx / val.idx   uint64 document start offsets, num_documents + 1 entries (last = total)
    tokenizer.json        the tokenizer that produced the ids
    meta.json             tokenizer sha256 and special ids, per-split counts, how the validation split
                          was made (``calm.data.split``), sources, seed, format

Ids are ``uint32`` because the paper's Llama-3 vocabulary (128,257 ids) overflows ``uint16``.
Two views serve the two stages:

- ``lm_blocks``: the LM / baseline packing, HF ``group_texts``: documents concatenated (BOS already
  in front of each, no EOS), cut into ``block_size`` blocks, remainder dropped.
- ``ae_chunks``: the autoencoder packing: each document + EOS, right-padded with PAD to a multiple
  of K, so no K-token chunk straddles two documents; cached as ``{split}.ae{K}.bin``.

``BatchSampler`` draws the same global batches whatever the number of ranks, and resumes exactly
from its ``state_dict``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calm.data.corpus import iter_documents
from calm.data.tokenizer import Tokenizer
from calm.io import JSONFileError, atomic_file, read_json, write_json

FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype(np.uint32)
INDEX_DTYPE = np.dtype(np.uint64)
SPLITS = ("train", "val")


class DataError(ValueError):
    """Prepared data is missing, inconsistent or too small; the message says how to fix it."""


# ----------------------------------------------------------------------------------------------
# Writing shards


class ShardWriter:
    """Appends documents (token id sequences) to ``{split}.bin`` / ``{split}.idx`` in ``data_dir``."""

    def __init__(
        self, data_dir: str | Path, split: str, max_id: int | None = None, resume: dict[str, int] | None = None
    ) -> None:
        """``resume`` (``num_tokens``, ``num_documents`` of a :meth:`state`) reopens files written before
        and cuts them back to that state, dropping whatever was appended after it."""
        self.data_dir = Path(data_dir)
        self.split = split
        self.max_id = max_id
        self.num_tokens = 0 if resume is None else resume["num_tokens"]
        self.num_documents = 0 if resume is None else resume["num_documents"]
        bin_path, idx_path = self.data_dir / f"{split}.bin", self.data_dir / f"{split}.idx"
        if resume is None:
            self._bin, self._idx = open(bin_path, "wb"), open(idx_path, "wb")
            self._idx.write(np.zeros(1, INDEX_DTYPE).tobytes())
            return
        sizes = {
            bin_path: self.num_tokens * TOKEN_DTYPE.itemsize,
            idx_path: (self.num_documents + 1) * INDEX_DTYPE.itemsize,
        }
        for path, size in sizes.items():
            if not path.is_file() or path.stat().st_size < size:
                raise DataError(f"{path} is shorter than its recorded progress; start again with --overwrite")
        self._bin, self._idx = open(bin_path, "r+b"), open(idx_path, "r+b")
        for f, size in ((self._bin, sizes[bin_path]), (self._idx, sizes[idx_path])):
            f.truncate(size)
            f.seek(size)

    def state(self) -> dict[str, int]:
        """What :meth:`close` returns, after flushing both files to disk (a point to resume from)."""
        for f in (self._bin, self._idx):
            f.flush()
            os.fsync(f.fileno())
        return {"num_tokens": self.num_tokens, "num_documents": self.num_documents}

    def write(self, documents: Sequence[Sequence[int]]) -> None:
        if not documents:
            return
        lengths = np.fromiter((len(d) for d in documents), np.int64, len(documents))
        flat = np.fromiter(itertools.chain.from_iterable(documents), np.int64, int(lengths.sum()))
        if flat.size and (flat.min() < 0 or flat.max() > (self.max_id if self.max_id is not None else 2**32 - 1)):
            raise DataError(
                f"token id {int(flat.max())} or {int(flat.min())} is outside [0, {self.max_id}] of the "
                "vocabulary; the tokenizer and the meta vocab_size disagree"
            )
        self._bin.write(flat.astype(TOKEN_DTYPE).tobytes())
        ends = self.num_tokens + np.cumsum(lengths)
        self._idx.write(ends.astype(INDEX_DTYPE).tobytes())
        self.num_tokens = int(ends[-1])
        self.num_documents += len(documents)

    def close(self) -> dict[str, int]:
        self._bin.close()
        self._idx.close()
        return {"num_tokens": self.num_tokens, "num_documents": self.num_documents}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tokenizer_meta(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizer fields of meta.json (also what a checkpoint records to match data to a model)."""
    return {
        "tokenizer_name": tokenizer.name,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
    }


def check_tokenizer_match(meta: dict[str, Any], tokenizer: Tokenizer) -> None:
    """Raise if ``tokenizer`` is not the one that produced the shards described by ``meta``."""
    expected = meta.get("tokenizer_sha256")
    if expected != tokenizer.sha256:
        raise DataError(
            f"the data was tokenized with tokenizer sha256 {str(expected)[:12]}… "
            f"({meta.get('tokenizer_name')}, vocab {meta.get('vocab_size')}) but the tokenizer given is "
            f"{tokenizer.sha256[:12]}… ({tokenizer.name}, vocab {tokenizer.vocab_size}); use the data "
            "folder's tokenizer.json, or prepare the data again with this tokenizer"
        )


# ----------------------------------------------------------------------------------------------
# Reading shards


PREPARE_AGAIN = "run the `calm prepare` command that made this folder again, with --overwrite"
"""The remedy for a data folder that is damaged or incomplete (one command works for every layout)."""


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.is_file():
        if data_dir.is_dir() and any(data_dir.iterdir()):  # a folder of the user's own text, perhaps
            prepared = f"{str(data_dir).rstrip('/')}-prepared"
            raise DataError(
                f"{data_dir} is not a prepared data folder (it has no meta.json); to use the text files in it, "
                f"run `calm prepare --corpus {data_dir} --out {prepared}`, then pass {prepared}"
            )
        raise DataError(f"{path} not found; prepare the data first (`calm prepare --out {data_dir}`)")
    try:
        meta = read_json(path)
    except JSONFileError as e:
        raise DataError(f"{e.problem}; {PREPARE_AGAIN}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds a JSON {type(meta).__name__}, not an object; {PREPARE_AGAIN}")
    if meta.get("format_version") != FORMAT_VERSION or meta.get("dtype") != TOKEN_DTYPE.name:
        sources = " ".join(str(s) for s in meta.get("sources") or ["default"])
        newer = f"{str(data_dir).rstrip('/')}-v{FORMAT_VERSION}"
        raise DataError(
            f"{path} has format {meta.get('format_version')} / dtype {meta.get('dtype')}; this version of "
            f"calm reads format {FORMAT_VERSION} / {TOKEN_DTYPE.name}. Prepare it again with the same tokenizer: "
            f"`calm prepare --corpus {sources} --tokenizer {data_dir / 'tokenizer.json'} --out {newer}`"
        )
    return meta


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """Read-only memmap of ``count`` items, checking the file holds exactly that many."""
    if not path.is_file():
        raise DataError(f"{path} is missing; {PREPARE_AGAIN}")
    size, expected = path.stat().st_size, count * dtype.itemsize
    if size != expected:
        raise DataError(
            f"{path} holds {size} bytes but meta.json implies {expected} ({count} x {dtype.name}); the file "
            f"is truncated or from another run; {PREPARE_AGAIN}"
        )
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class TokenShard:
    """One split of a prepared folder: a uint32 token memmap and its document offsets."""

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = read_meta(self.data_dir)
        if split not in self.meta["splits"]:
            raise DataError(f"{self.data_dir} has no split {split!r}; it has {sorted(self.meta['splits'])}")
        info = self.meta["splits"][split]
        self.tokens = _memmap(self.data_dir / f"{split}.bin", TOKEN_DTYPE, info["num_tokens"])
        self.offsets = _memmap(self.data_dir / f"{split}.idx", INDEX_DTYPE, info["num_documents"] + 1)
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != info["num_tokens"]:
            raise DataError(
                f"{self.data_dir / f'{split}.idx'} does not match {split}.bin (offsets run "
                f"{int(self.offsets[0])}..{int(self.offsets[-1])}, expected 0..{info['num_tokens']}); "
                f"{PREPARE_AGAIN}"
            )

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer_sha256"]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def document(self, i: int) -> np.ndarray:
        """Tokens of document ``i`` ([BOS] + text tokens), a view into the memmap."""
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"document {i} out of range: the {self.split} split has {self.num_documents}")
        i %= self.num_documents
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def __len__(self) -> int:
        return self.num_documents

    def __repr__(self) -> str:
        counts = f"{self.num_documents} docs, {self.num_tokens} tokens"
        return f"TokenShard({str(self.data_dir)!r}, {self.split!r}: {counts})"


def lm_blocks(shard: TokenShard, block_size: int) -> np.ndarray:
    """(num_blocks, block_size) view of the concatenated tokens; the remainder is dropped (as HF ``group_texts``)."""
    num_blocks = shard.num_tokens // block_size if block_size > 0 else 0
    if num_blocks == 0:
        raise DataError(
            f"the {shard.split} split of {shard.data_dir} has {shard.num_tokens} tokens, fewer than one "
            f"block of {block_size}; prepare more text or use a smaller block size"
        )
    return shard.tokens[: num_blocks * block_size].reshape(num_blocks, block_size)


def _ae_layout(shard: TokenShard, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.diff(shard.offsets.astype(np.int64))
    padded = -(-(lengths + 1) // chunk_size) * chunk_size  # + EOS, rounded up to a multiple of K
    starts = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
    return lengths, starts


def ae_chunks(
    shard: TokenShard,
    chunk_size: int,
    eos_id: int | None = None,
    pad_id: int | None = None,
    batch_tokens: int = 1 << 22,
) -> np.ndarray:
    """(num_chunks, chunk_size) uint32 autoencoder items (the autoencoder packing above), cached in the data folder.

    Each document (as stored, starting with BOS) gets EOS appended and is right-padded with PAD to
    a multiple of ``chunk_size``; chunks never straddle documents. ``eos_id`` / ``pad_id`` default
    to the tokenizer's. Built in token batches of ``batch_tokens``, written atomically to
    ``{split}.ae{K}.bin`` (with a ``.json`` sidecar) and memmapped.
    """
    if chunk_size < 1:
        raise DataError(f"chunk_size must be >= 1, got {chunk_size}")
    eos_id = shard.meta["eos_id"] if eos_id is None else int(eos_id)
    pad_id = shard.meta["pad_id"] if pad_id is None else int(pad_id)
    if shard.num_documents == 0:
        raise DataError(f"the {shard.split} split of {shard.data_dir} has no documents; prepare more text")
    path = shard.data_dir / f"{shard.split}.ae{chunk_size}.bin"
    sidecar = path.with_suffix(".json")
    lengths, starts = _ae_layout(shard, chunk_size)
    total = int(starts[-1] + -(-(lengths[-1] + 1) // chunk_size) * chunk_size)
    expected = {
        "chunk_size": chunk_size,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "num_chunks": total // chunk_size,
        "tokenizer_sha256": shard.tokenizer_sha256,
        "source_tokens": shard.num_tokens,
        "source_documents": shard.num_documents,
    }
    try:
        cached = read_json(sidecar) if sidecar.is_file() else None
    except JSONFileError:  # a damaged cache is rebuilt
        cached = None
    if cached != expected or not path.is_file() or path.stat().st_size != total * TOKEN_DTYPE.itemsize:
        _build_ae_file(shard, path, lengths, starts, total, eos_id, pad_id, batch_tokens)
        write_json(sidecar, expected)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(total // chunk_size, chunk_size))


def _build_ae_file(
    shard: TokenShard,
    path: Path,
    lengths: np.ndarray,
    starts: np.ndarray,
    total: int,
    eos_id: int,
    pad_id: int,
    batch_tokens: int,
) -> None:
    offsets = shard.offsets.astype(np.int64)
    with atomic_file(path) as tmp:
        out = np.memmap(tmp, dtype=TOKEN_DTYPE, mode="w+", shape=(total,))
        out[:] = pad_id
        first = 0
        while first < shard.num_documents:
            # the documents whose tokens fit in one batch (at least one document)
            last = int(np.searchsorted(offsets, offsets[first] + batch_tokens, side="right")) - 1
            last = min(max(last, first + 1), shard.num_documents)
            lo, hi = int(offsets[first]), int(offsets[last])
            doc_lengths = lengths[first:last]
            doc_of_token = np.repeat(np.arange(last - first), doc_lengths)
            within = np.arange(hi - lo) - (offsets[first:last] - lo)[doc_of_token]
            out[starts[first:last][doc_of_token] + within] = shard.tokens[lo:hi]
            out[starts[first:last] + doc_lengths] = eos_id
            first = last
        out.flush()
        del out


# ----------------------------------------------------------------------------------------------
# Batches


class BatchSampler:
    """Deterministic shuffled item indices, identical global batches for any number of ranks.

    Each epoch is a permutation of ``range(num_items)`` drawn from ``numpy.random.default_rng((seed,
    epoch))``. A global micro-batch is the next ``items_per_rank * world_size`` items of it; rank r
    takes the r-th contiguous slice. When fewer than a global micro-batch remain, the rest of the
    epoch is skipped and the next epoch starts. So one rank with ``2b`` items per step sees exactly
    the concatenation of what two ranks with ``b`` each see.
    """

    def __init__(self, num_items: int, items_per_rank: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if items_per_rank < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad sampler setup: items_per_rank={items_per_rank}, rank={rank}, world_size={world_size}")
        self.global_batch = items_per_rank * world_size
        if num_items < self.global_batch:
            raise DataError(
                f"only {num_items} items but one global micro-batch needs {self.global_batch} "
                f"({items_per_rank} per rank x {world_size} ranks); prepare more data or use a smaller batch"
            )
        self.num_items = num_items
        self.items_per_rank = items_per_rank
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_items)
        return self._perm

    def next_indices(self) -> np.ndarray:
        """This rank's item indices for the next micro-batch (int64, length ``items_per_rank``)."""
        if self.position + self.global_batch > self.num_items:
            self.epoch += 1
            self.position = 0
            self._perm = None
        start = self.position + self.rank * self.items_per_rank
        indices = self._permutation()[start : start + self.items_per_rank]
        self.position += self.global_batch
        return indices.astype(np.int64)

    def batches_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._perm = None


# ----------------------------------------------------------------------------------------------
# Evaluation text


def read_text_file_tokens(path: str | Path, tokenizer: Tokenizer) -> list[np.ndarray]:
    """Token ids of every document of a .txt/.jsonl/.json file, each [BOS] + tokens, unsplit (uint32).

    For evaluation sets such as ``data/wikitext103/test.jsonl``, scored document by document.
    """
    texts = list(iter_documents([path], max_words=None))
    if not texts:
        raise DataError(f"{path} holds no non-empty documents")
    return [np.array([tokenizer.bos_id, *ids], dtype=TOKEN_DTYPE) for ids in tokenizer.encode_batch(texts)]
