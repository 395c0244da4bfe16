"""Text in, tokens out: corpora, the train / validation split, tokenizers, token shards, evaluation sets.

Paper §7.1 (data). ``corpus`` reads text (local files, the pinned default corpus, Hugging Face
datasets); ``split`` holds documents out for validation; ``tokenizer`` wraps Hugging Face
``tokenizers`` (a trained BPE or the paper's Llama-3 tokenizer); ``shards`` tokenizes a corpus once
into uint32 memmaps and serves training items from them; ``evalsets`` names the evaluation sets
(the WikiText-103 test set ships with calm) and turns evaluation text into token ids.
"""
