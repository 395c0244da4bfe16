"""``calm prepare``: a text corpus of any size to token shards, streamed and resumable (paper §7.1 data).

The folder it writes is described in :mod:`calm.data.shards`. The corpus is never held in memory:
documents are read once to plan the validation split (sizes only), once to train the tokenizer (with
``tokenizer="train"``) and once to tokenize, 256 documents per ``encode_batch`` call (the tokenizers
library spreads a call over the CPU's threads).

**Stopping and resuming** (ours). Work happens in a hidden folder next to the output,
``.NAME.partial``, which becomes ``NAME`` only once complete. While tokenizing, every
``CHECKPOINT_SECONDS`` the shard files are flushed to disk and ``progress.json`` records how many
documents are done and the files' lengths. After Ctrl-C (or a crash), running the same command with
``--resume`` reloads the tokenizer saved there, cuts the shards back to the last record and goes on
from the next document: the result is the folder an uninterrupted run writes, byte for byte. The same
command without ``--resume`` refuses to start while the partial folder exists (``--overwrite``
discards it).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from calm.data.corpus import Document, Source, resolve_sources
from calm.data.shards import (
    FORMAT_VERSION,
    INDEX_DTYPE,
    SPLITS,
    TOKEN_DTYPE,
    DataError,
    ShardWriter,
    tokenizer_meta,
)
from calm.data.split import MIN_VAL_BYTES, SplitError, plan_split
from calm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from calm.io import read_json, remove_directory, replace_directory, write_json

PROGRESS_FILE = "progress.json"
CHECKPOINT_SECONDS = 30.0
"""Seconds between progress records while tokenizing (each flushes the shards to disk)."""


def partial_dir(out_dir: str | Path) -> Path:
    """Where ``prepare`` works before the result becomes ``out_dir``: ``.NAME.partial`` beside it."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.partial")


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def prepare(
    out_dir: str | Path,
    sources: Sequence[str] | None = None,
    tokenizer: str = "train",
    vocab_size: int = 4096,
    val_fraction: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    wikitext: bool = True,
    cache: str | Path | None = None,
    batch_documents: int = 256,
    min_val_bytes: int = MIN_VAL_BYTES,
    text_field: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Tokenize ``sources`` into ``out_dir`` (layout: :mod:`calm.data.shards`) and return its meta.

    sources: ``None`` or ``["default"]`` (the default corpus), file or folder paths,
        ``hf:NAME[:CONFIG][:SPLIT]``.
    tokenizer: ``"train"`` (a byte-level BPE of ``vocab_size`` trained on the train split),
        ``"llama3"`` (the paper's), or a tokenizer.json path.
    vocab_size: 4,096 by default. The autoencoder can only reconstruct ids it has seen often; on
        the default corpus 0.24% of WikiText-103 test tokens have ids seen < 100 times in training
        with 4,096 (2,048: 0.12% but 1.90 tokens/word instead of 1.65; 8,192: 0.81%; Llama-3's
        128k: 22.7%, and 1.5% never seen).
    val_fraction: share of documents (by seeded hash of their key) held out for validation.
    min_val_bytes: a validation split smaller than min(this, a fifth of the corpus) is topped up
        with whole documents or the tail of the longest one (``calm.data.split``); 0 keeps the hash split.
        ``meta["validation"]["description"]`` says what was done. A corpus too small for any split
        raises ``DataError`` here, before anything is written.
    wikitext: include the WikiText-style rendering of the Wikipedia leads (default corpus only).
    text_field: the JSON field (or dataset column) holding the text of one's own ``.jsonl``/``.json``
        files or ``hf:`` dataset (default: ``text``, then ``extract``). Line endings of one's own
        text are normalised to LF (``calm.data.corpus.normalise_newlines``).
    resume: continue an interrupted run of the same call (module docstring).

    Raises ``DataError`` for an existing ``out_dir`` (unless ``overwrite``), an interrupted run left
    without ``resume``, a resume with other settings, and a corpus too small to split.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise DataError(
            f"{out_dir} already exists and is not empty; choose another folder or pass --overwrite "
            "(overwrite=True from Python)"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    specs = [str(s) for s in sources] if sources else ["default"]
    settings = {
        "sources": specs, "tokenizer": tokenizer, "vocab_size": vocab_size, "val_fraction": val_fraction,
        "seed": seed, "wikitext": wikitext, "min_val_bytes": min_val_bytes, "text_field": text_field,
        "batch_documents": batch_documents,
    }  # fmt: skip
    work = partial_dir(out_dir)
    state = _resume_state(work, settings, resume, overwrite)
    resolved = resolve_sources(sources, cache, wikitext, text_field)
    corpus = _SplitCorpus(resolved, specs, seed, val_fraction, min_val_bytes)
    if state is None:
        if work.exists():
            remove_directory(work)
        work.mkdir(parents=True)
    try:
        if state is None:
            tok = _train_or_load_tokenizer(tokenizer, corpus, vocab_size, cache)
            tok.save(work / "tokenizer.json")
        else:
            tok = Tokenizer.from_file(work / "tokenizer.json", name=state["tokenizer_name"])
        counts, components = _write_shards(work, tok, corpus.parts(), progress, out_dir.name, settings, state)
    except BaseException:
        if not (work / PROGRESS_FILE).exists():  # nothing worth resuming
            remove_directory(work)
        raise
    if counts["train"]["num_documents"] == 0:
        remove_directory(work)
        raise corpus.no_training_documents()
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": TOKEN_DTYPE.name,
        "index_dtype": INDEX_DTYPE.name,
        **tokenizer_meta(tok),
        "splits": counts,
        "sources": specs,
        "components": components,
        "wikitext": wikitext,
        "seed": seed,
        "val_fraction": val_fraction,
        "validation": corpus.plan.info,
    }
    write_json(work / "meta.json", meta)
    (work / PROGRESS_FILE).unlink(missing_ok=True)
    replace_directory(work, out_dir)
    return meta


def _resume_state(work: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The progress record to continue from, or None to start afresh (see the module docstring)."""
    record = work / PROGRESS_FILE
    if not record.exists() or (overwrite and not resume):
        return None
    state = read_json(record)
    done = f"{state['parts_done']:,} documents tokenized"
    if not resume:
        raise DataError(
            f"an interrupted `calm prepare` left {work} ({done}); run the same command with --resume to "
            "continue it, or with --overwrite to start again"
        )
    changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
    if changed:
        raise DataError(
            f"{work} was started with other settings ({', '.join(changed)}); resume with the settings it began "
            "with, or pass --overwrite (without --resume) to start again"
        )
    return state


class _SplitCorpus:
    """The sources of ``prepare`` with their train / validation plan; every pass reads them afresh.

    The plan is made on construction, from one pass over the documents' sizes (none when
    ``val_fraction`` is 0); a corpus too small for any split raises ``DataError`` there.
    """

    def __init__(
        self, sources: list[Source], specs: list[str], seed: int, val_fraction: float, min_val_bytes: int
    ) -> None:
        self.sources, self.specs = sources, specs
        sizes = ((doc.key, len(doc.text.encode("utf-8"))) for _, doc in self.documents()) if val_fraction > 0 else ()
        try:
            self.plan = plan_split(sizes, seed, val_fraction, min_val_bytes, self._text_of)
        except SplitError as e:
            raise DataError(f"{specs}: {e}") from None

    def documents(self) -> Iterator[tuple[str, Document]]:
        """(source name, document) of every document, in order."""
        for source in self.sources:
            for doc in source.documents():
                yield source.name, doc

    def _text_of(self, index: int) -> str:
        return next(itertools.islice(self.documents(), index, None))[1].text

    def parts(self) -> Iterator[tuple[str, str, str]]:
        """(source name, split, text) of every document part, as planned."""
        for index, (name, doc) in enumerate(self.documents()):
            for split, text in self.plan.assign(index, doc.key, doc.text):
                yield name, split, text

    def no_training_documents(self) -> DataError:
        return DataError(
            f"the corpus {self.specs} has no training documents (it is empty, or every document fell "
            "into the validation split); add text or lower val_fraction"
        )


def _train_or_load_tokenizer(
    tokenizer: str, corpus: _SplitCorpus, vocab_size: int, cache: str | Path | None
) -> Tokenizer:
    """``"train"``: a ``vocab_size`` BPE trained on the training split; otherwise ``load_tokenizer(tokenizer)``."""
    if tokenizer != "train":
        return load_tokenizer(tokenizer, cache)
    seen = [0]

    def train_texts() -> Iterator[str]:
        for _, split, text in corpus.parts():
            if split == "train":
                seen[0] += 1
                yield text

    tok = train_bpe(train_texts(), vocab_size)
    if seen[0] == 0:
        raise corpus.no_training_documents()
    return tok


def _write_shards(
    folder: Path,
    tok: Tokenizer,
    parts: Iterable[tuple[str, str, str]],
    progress: bool,
    name: str,
    settings: dict[str, Any],
    state: dict[str, Any] | None,
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Tokenize ``parts`` ((source name, split, text)) into the split shards of ``folder``, each document as
    [BOS] + tokens, from where ``state`` (a progress record) left off; returns the per-split counts
    (documents, tokens, bytes) and the per-source ones (``meta["components"]``)."""
    done = 0 if state is None else state["parts_done"]
    writers = {
        split: ShardWriter(folder, split, tok.vocab_size - 1, None if state is None else state["writers"][split])
        for split in SPLITS
    }
    components: dict[str, dict[str, int]] = {} if state is None else state["components"]
    split_bytes = dict.fromkeys(SPLITS, 0) if state is None else state["split_bytes"]

    def record() -> None:
        states = {split: w.state() for split, w in writers.items()}  # flushed before the record names them
        progress_record = {"settings": settings, "tokenizer_name": tok.name, "parts_done": done, "writers": states}
        write_json(folder / PROGRESS_FILE, {**progress_record, "components": components, "split_bytes": split_bytes})

    bar = tqdm(desc=f"tokenizing -> {name}", unit=" docs", initial=done, disable=not progress)
    last, writing = time.monotonic(), False
    try:
        for batch in _batched(itertools.islice(parts, done, None), settings["batch_documents"]):
            ids = tok.encode_batch([text for _, _, text in batch])
            writing = True  # from here to the end of the batch, the files and the counts disagree
            grouped: dict[str, list[list[int]]] = {split: [] for split in SPLITS}
            for (source, split, text), doc_ids in zip(batch, ids):
                grouped[split].append([tok.bos_id, *doc_ids])
                nbytes = len(text.encode("utf-8"))
                split_bytes[split] += nbytes
                stats = components.setdefault(source, {"num_documents": 0, "num_bytes": 0, "num_tokens": 0})
                stats["num_documents"] += 1
                stats["num_bytes"] += nbytes
                stats["num_tokens"] += len(doc_ids) + 1
            for split, docs in grouped.items():
                writers[split].write(docs)
            done += len(batch)
            writing = False
            bar.update(len(batch))
            bar.set_postfix(tokens=sum(w.num_tokens for w in writers.values()))
            if time.monotonic() - last >= CHECKPOINT_SECONDS:
                record()
                last = time.monotonic()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) and not writing:  # between batches: all so far can be kept
            record()
        for writer in writers.values():
            writer.close()
        if isinstance(e, KeyboardInterrupt) and (folder / PROGRESS_FILE).exists():
            kept = read_json(folder / PROGRESS_FILE)["parts_done"]
            print(
                f"stopped: {kept:,} documents are tokenized in {folder}; run the same command with --resume "
                "to continue",
                file=sys.stderr,
            )
        raise
    finally:
        bar.close()
    counts = {split: writer.close() for split, writer in writers.items()}
    for split in SPLITS:
        counts[split]["num_bytes"] = split_bytes[split]
    return counts, components
