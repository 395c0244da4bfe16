"""Evaluation text: named evaluation sets, and documents as token ids for BrierLM and the autoencoder.

The paper scores BrierLM on the WikiText-103 test set at document level (paper §7.1, Table 1); that file
ships with calm (``wikitext103/test.jsonl.gz``, 62 articles, 241k words) and is named ``wikitext103``
wherever an evaluation set is expected (``calm eval --data wikitext103``). Any other text file
(``.txt``, ``.jsonl``, ``.json``, gzipped or not) or a prepared data directory (its validation split)
is accepted too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calm.data.shards import TokenShard, check_tokenizer_match, read_text_file_tokens
from calm.data.tokenizer import Tokenizer

WIKITEXT103_TEST = Path(__file__).parent / "wikitext103" / "test.jsonl.gz"
"""The WikiText-103 test set, document level: the file the paper's Table 1 scores, shipped with calm."""

EVAL_SETS: dict[str, Path] = {"wikitext103": WIKITEXT103_TEST}
"""Evaluation sets known by name: ``--data NAME`` wherever an evaluation text is expected."""


def resolve_eval_data(data: str | Path) -> Path:
    """A named evaluation set (:data:`EVAL_SETS`) -> its file; any other value -> that path, which must exist.

    Raises ``FileNotFoundError`` naming the known sets when neither applies.
    """
    if str(data) in EVAL_SETS:
        return EVAL_SETS[str(data)]
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(
            f"evaluation data {path} does not exist; pass a text/jsonl file, a prepared data dir, or a named set "
            f"({', '.join(EVAL_SETS)})"
        )
    return path


def load_eval_documents(data: str | Path, tokenizer: Tokenizer, split: str = "val") -> list[np.ndarray]:
    """Token ids per document ([BOS] + text): a named set, a raw text file, or a prepared data dir's ``split``.

    A prepared directory must have been tokenized with ``tokenizer`` (checked by its sha256).
    """
    path = resolve_eval_data(data)
    if path.is_dir() and (path / "meta.json").exists():
        shard = TokenShard(path, split)
        check_tokenizer_match(shard.meta, tokenizer)
        return [np.asarray(shard.document(i)) for i in range(shard.num_documents)]
    return read_text_file_tokens(path, tokenizer)


def pack_documents_for_ae(docs: list[np.ndarray], chunk_size: int, eos_id: int, pad_id: int) -> np.ndarray:
    """The autoencoder's packing (paper §3; as in training): each document + EOS, right-padded with PAD to a
    multiple of K, then cut into chunks -> (n, K) token ids. Raises ``ValueError`` when ``docs`` is empty."""
    rows = []
    for doc in docs:
        seq = np.concatenate([np.asarray(doc, dtype=np.int64), [eos_id]])
        pad = (-len(seq)) % chunk_size
        rows.append(np.concatenate([seq, np.full(pad, pad_id, dtype=np.int64)]))
    if not rows:
        raise ValueError("no documents to evaluate; the evaluation file is empty")
    return np.concatenate(rows).reshape(-1, chunk_size)


def eval_set_name(path: str | Path) -> str:
    """How reports name an evaluation text: "WikiText-103 test" for the shipped set, else the file's name."""
    path = Path(path)
    return "WikiText-103 test" if path.resolve() == WIKITEXT103_TEST.resolve() else path.name
