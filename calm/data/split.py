"""The train / validation split of a corpus, with a usable validation split for small corpora.

Ours; the paper's data is described in its §7.1. Documents go to validation by a seeded hash of
their key (``split_of``), so the split is deterministic and a document's pieces stay together. On a
large corpus that is all. On a small one the hash can hold out nothing: one text file is one
document, and 31 documents at 1% give none. Every training stage evaluates on the validation split,
so ``plan_split`` tops it up to a minimum amount of text, ``min(min_val_bytes, MAX_HOLDOUT x corpus)``:

1. whole documents (key groups) move from train to val, in a seeded hash order, as long as the
   split stays under 1.5 times that minimum;
2. if that is not enough (a few long documents), the tail of the longest training document is
   held out at a word boundary (at most half of that document), the rest stays in train.

Sizes are counted in UTF-8 bytes because the plan is made before the tokenizer exists (the
tokenizer is then trained on the train side only). A corpus whose fifth is under
``MIN_HOLDOUT_BYTES`` is too small for any split and is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MIN_VAL_BYTES = 16_384
"""Default minimum validation text: 16 KiB, about 4,000 tokens with a 4,096-entry BPE, enough for
several blocks of every tiny preset (CALM 1,024 tokens, GPT 256)."""
MAX_HOLDOUT = 0.2
"""The minimum is at most this share of the corpus (whole documents may overshoot it by half)."""
MIN_HOLDOUT_BYTES = 1_024
"""Below this much held-out text (a corpus under 5 KiB) no split is usable."""


class SplitError(ValueError):
    """The corpus is too small to hold out a validation split; the message says what to do."""


def split_of(key: str, seed: int, val_fraction: float) -> str:
    """``"val"`` or ``"train"``, decided by a seeded sha1 of the document key (stable across runs)."""
    digest = hashlib.sha1(f"{seed}\0{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


@dataclass
class SplitPlan:
    """Which split each document of the stream goes to (by its index in the stream)."""

    val_fraction: float
    seed: int
    moved: set[int] = field(default_factory=set)
    """Documents moved from train to val by the top-up."""
    cut: tuple[int, int] | None = None
    """(document index, character offset): the text from the offset on is held out as validation."""
    info: dict[str, Any] = field(default_factory=dict)
    """How the split was made, for meta.json; ``info["description"]`` is one human sentence."""

    def assign(self, index: int, key: str, text: str) -> list[tuple[str, str]]:
        """(split, text) parts of document ``index``: one part, or two where its tail is held out."""
        if self.cut is not None and index == self.cut[0]:
            return [("train", text[: self.cut[1]]), ("val", text[self.cut[1] :])]
        if index in self.moved:
            return [("val", text)]
        return [(split_of(key, self.seed, self.val_fraction), text)]


def _word_boundary_cut(text: str, tail_bytes: int) -> int:
    """A character offset leaving at least about ``tail_bytes`` bytes of ``text`` after it, at the
    start of a whitespace run (no word is split), with at least half of the text before it."""
    size = len(text.encode("utf-8"))
    target = len(text) - round(len(text) * min(tail_bytes, size // 2) / max(size, 1))
    starts = [m.start() for m in re.finditer(r"\s+", text)]
    before = [p for p in starts if len(text) // 2 <= p <= target]
    after = [p for p in starts if p > target]
    return before[-1] if before else after[0] if after else len(text)


def plan_split(
    documents: Iterable[tuple[str, int]],
    seed: int,
    val_fraction: float,
    min_val_bytes: int = MIN_VAL_BYTES,
    text_of: Any = None,
) -> SplitPlan:
    """Plan the split of ``documents``, an iterable of (key, UTF-8 size) in stream order.

    ``text_of(index) -> str`` returns a document's text; it is called only for a tail cut.
    Raises ``SplitError`` when ``val_fraction > 0`` but the corpus is too small for any split.
    """
    plan = SplitPlan(val_fraction, seed)
    keys, sizes = [], []
    for key, size in documents:
        keys.append(key)
        sizes.append(size)
    total = sum(sizes)
    val = sum(s for k, s in zip(keys, sizes) if split_of(k, seed, val_fraction) == "val")
    if val_fraction == 0:
        plan.info = {"method": "none", "description": "no validation split (val_fraction 0)"}
        return plan
    floor = min(min_val_bytes, int(MAX_HOLDOUT * total))
    if val >= floor:
        plan.info = {"method": "hash", "description": f"val: {val_fraction:g} of documents by hash"}
        return plan
    if total > 0 and int(MAX_HOLDOUT * total) < MIN_HOLDOUT_BYTES:
        raise SplitError(
            f"the corpus holds {total:,} bytes of text, too little to hold out a validation split (a fifth of it "
            f"must be at least {MIN_HOLDOUT_BYTES:,} bytes, so at least {int(MIN_HOLDOUT_BYTES / MAX_HOLDOUT):,} "
            "bytes in all); add text, or pass val_fraction 0 (--val-fraction 0) to skip validation"
        )
    hash_val = val
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if split_of(key, seed, val_fraction) == "train":
            groups.setdefault(key, []).append(i)
    cap = floor + floor // 2  # whole documents may overshoot the minimum by half of it
    order = sorted(groups, key=lambda k: hashlib.sha1(f"{seed}\0holdout\0{k}".encode()).digest())
    train_count = sum(map(len, groups.values()))
    for key in order:
        size = sum(sizes[i] for i in groups[key])
        if val + size <= cap and len(plan.moved) + len(groups[key]) < train_count:  # train keeps a document
            plan.moved.update(groups[key])
            val += size
            if val >= floor:
                break
    moved_bytes = val - hash_val
    parts = [f"val: the hash split ({val_fraction:g} of documents) held out {hash_val:,} bytes"]
    if moved_bytes:
        parts.append(f"moved {len(plan.moved)} whole documents ({moved_bytes:,} bytes) to validation")
    train_docs = [i for key in groups for i in groups[key] if i not in plan.moved]
    if val < floor and text_of is not None and train_docs:
        longest = max(train_docs, key=lambda i: sizes[i])
        text = text_of(longest)
        offset = _word_boundary_cut(text, floor - val)
        tail = len(text[offset:].encode("utf-8"))
        if text[offset:].strip() and text[:offset].strip():
            plan.cut = (longest, offset)
            val += tail
            parts.append(
                f"held out the last {tail:,} bytes ({len(text[offset:].split()):,} words) of the longest "
                f"document ({sizes[longest]:,} bytes; its start stays in train)"
            )
    if val == 0:
        raise SplitError(
            f"could not hold out any validation text from {len(keys)} documents ({total:,} bytes): no document "
            "or document tail fits; add text, or pass val_fraction 0 (--val-fraction 0) to skip validation"
        )
    parts.append(f"to reach the minimum validation text of min({min_val_bytes:,} bytes, a fifth of the corpus)")
    plan.info = {
        "method": "tail" if plan.cut else "documents",
        "description": "; ".join(parts),
        "hash_val_bytes": hash_val,
        "moved_documents": len(plan.moved),
        "val_bytes": val,
        "min_val_bytes": floor,
    }
    return plan
