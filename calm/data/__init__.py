"""Text in, tokens out: corpora, the train / validation split, tokenizers, token shards, evaluation sets.

CALM-SPEC §1 (data). ``corpus`` reads text (local files, the pinned default corpus, Hugging Face
datasets); ``split`` holds documents out for validation; ``tokenizer`` wraps Hugging Face
``tokenizers`` (a trained BPE or the paper's Llama-3 tokenizer); ``shards`` tokenizes a corpus once
into uint32 memmaps and serves training items from them. The WikiText-103 test set that the paper
scores ships with the package (``wikitext103/test.jsonl``, :data:`WIKITEXT103_TEST`).
"""

from pathlib import Path

WIKITEXT103_TEST = Path(__file__).parent / "wikitext103" / "test.jsonl"
"""The WikiText-103 test set, document level (the file the paper's Table 1 scores), shipped with calm."""
