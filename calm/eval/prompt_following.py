"""Does a model's continuation follow its prompt? A sample-only check for CALM and the GPT (ours).

BrierLM (paper §5) scores next-token predictions under teacher forcing; it does not say whether
free-running text stays on the prompt's subject. This module measures that from samples alone, so
CALM, which has no likelihood, and the GPT baseline are scored the same way
(docs/guides/evaluation.md#prompt-following-calm-follow-ours).

**The measure: prompt retrieval AUC.** Take P validation documents; prompt each model with the
first ``prompt_tokens`` tokens of each and let it continue for ``new_tokens`` tokens (temperature
T, one seed). Each continuation g_i is then scored against every prompt p_j with a
query-likelihood retrieval model (Dirichlet-smoothed unigram, Zhai & Lafferty 2001):

    s_ij = Σ_{t ∈ g_i} log[(c_j(t) + β·P(t)) / (|p_j| + β)] − log P(t),

where c_j(t) counts token t in p_j and P is the unigram of the training split. Tokens frequent
everywhere cancel; a rare token that the prompt also holds (a name, a place, a date, the play
layout of a Shakespeare scene) counts most. The AUC of continuation i is the fraction of other
prompts j it matches less well than its own (ties half): 0.5 means it could have come from any
prompt, 1 that its own prompt is always the best match. The model's AUC is the mean over the P
continuations; its standard error treats those as independent. The real continuations of the same
documents give the ceiling on the same prompts.

It is a lexical measure: it sees whether the continuation reuses the prompt's rarer words and
register, not whether it is grammatical or true. An empty continuation (the model ended the
document at once) scores 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calm.data.shards import TokenShard, check_tokenizer_match
from calm.generate.lm import as_language_model

DEFAULT_BETA = 100.0
"""Dirichlet pseudo-count β of the prompt's unigram, in tokens (a prompt is 64 by default)."""


@dataclass
class PromptSet:
    """Prompts cut from validation documents, with their real continuations."""

    prompts: list[list[int]]
    """Text token ids of each prompt (BOS excluded), ``prompt_tokens`` each."""
    references: list[list[int]]
    """The next ``new_tokens`` token ids of the same document."""
    documents: list[int]
    """Index of each prompt's document in the split."""


def prompt_set(shard: Any, num_prompts: int, prompt_tokens: int, new_tokens: int, bos_id: int) -> PromptSet:
    """Up to ``num_prompts`` prompts from the starts of ``shard``'s documents (a ``TokenShard``).

    Documents shorter than BOS + ``prompt_tokens`` + ``new_tokens`` are skipped; of the rest,
    ``num_prompts`` are taken evenly spaced in document order (all of them if fewer). Raises
    ValueError when no document is long enough.
    """
    if num_prompts < 2 or prompt_tokens < 1 or new_tokens < 1:
        raise ValueError(
            "need num_prompts >= 2, prompt_tokens >= 1 and new_tokens >= 1; "
            f"got {num_prompts}, {prompt_tokens} and {new_tokens}"
        )
    need = prompt_tokens + new_tokens
    eligible = []
    for i in range(len(shard)):
        doc = np.asarray(shard.document(i))
        text = doc[1:] if len(doc) and int(doc[0]) == bos_id else doc
        if len(text) >= need:
            eligible.append((i, text))
    if len(eligible) < 2:
        raise ValueError(
            f"{shard} has {len(eligible)} document(s) of at least {need} tokens; prompt following needs 2 or more. "
            "Shorten --prompt-tokens / --new-tokens or use a larger validation split"
        )
    picks = np.unique(np.linspace(0, len(eligible) - 1, min(num_prompts, len(eligible))).round().astype(int))
    chosen = [eligible[k] for k in picks]
    return PromptSet(
        prompts=[text[:prompt_tokens].tolist() for _, text in chosen],
        references=[text[prompt_tokens:need].tolist() for _, text in chosen],
        documents=[i for i, _ in chosen],
    )


def unigram(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Add-one unigram distribution (vocab_size,) of a token array: the background P of the score."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    return (counts + 1.0) / (counts.sum() + vocab_size)


def retrieval_scores(
    prompts: list[list[int]], continuations: list[list[int]], background: np.ndarray, beta: float = DEFAULT_BETA
) -> np.ndarray:
    """Query-likelihood scores s (P, P): s[i, j] = how well prompt j explains continuation i.

    ``background``: unigram P (V,) with every entry > 0. Both lists hold token ids; ids outside
    the vocabulary raise ValueError. Formula in the module docstring.
    """
    vocab = len(background)
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    for ids in (*prompts, *continuations):
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise ValueError(f"token id out of range for a background of {vocab} entries")
    log_bg = np.log(background)
    counts = np.stack([np.bincount(np.asarray(p, dtype=np.int64), minlength=vocab) for p in prompts])
    lengths = counts.sum(axis=1, keepdims=True)
    log_ratio = np.log((counts + beta * background) / (lengths + beta)) - log_bg  # (P, V)
    bags = np.stack([np.bincount(np.asarray(g, dtype=np.int64), minlength=vocab) for g in continuations])
    return bags.astype(np.float64) @ log_ratio.T


def retrieval_auc(scores: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean prompt-retrieval AUC, its standard error, and the per-continuation AUCs (P,).

    ``scores`` (P, P) from :func:`retrieval_scores`, P ≥ 2. Row i's AUC is the fraction of j ≠ i
    with s[i, i] > s[i, j], ties counting one half; chance is 0.5.
    """
    n = scores.shape[0]
    if scores.shape != (n, n) or n < 2:
        raise ValueError(f"scores must be square with at least 2 rows, got shape {scores.shape}")
    own = np.diag(scores)[:, None]
    wins = (own > scores).sum(axis=1) + 0.5 * ((own == scores).sum(axis=1) - 1)
    per_row = wins / (n - 1)
    se = float(per_row.std(ddof=1) / np.sqrt(n))
    return float(per_row.mean()), se, per_row


def _continue(model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int, **kwargs: Any) -> list[list[int]]:
    """Each prompt's continuation ids (``LanguageModel.complete``: CALM in one batch, the GPT one prompt at a time)."""
    texts = [tokenizer.decode(p) for p in prompts]
    return [c.token_ids for c in as_language_model(model, tokenizer).complete(texts, new_tokens, **kwargs)]


def prompt_following(
    models: dict[str, Any],
    tokenizer: Any,
    data_dir: str | Path,
    *,
    num_prompts: int = 128,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    temperature: float = 0.5,
    num_samples: int = 200,
    seed: int = 0,
    beta: float = DEFAULT_BETA,
    examples: int = 3,
) -> dict[str, Any]:
    """Prompt retrieval AUC of each model in ``models`` (name -> CALM or GPT) and of the real text.

    Prompts come from the validation split of the prepared ``data_dir`` (:func:`prompt_set`), the
    background unigram from its training split. Every model continues the same prompts with the
    same seed at ``temperature`` (CALM: batch approximation with ``num_samples`` candidates;
    ``stop_at_document_end`` as in ``calm generate``). Returns ``{"settings": ..., "results":
    {name: {"auc", "auc_se", "mean_new_tokens"}}, "examples": [...]}``, the real text under
    ``"reference"``.
    """
    val, train = TokenShard(data_dir, "val"), TokenShard(data_dir, "train")
    check_tokenizer_match(val.meta, tokenizer)
    background = unigram(np.asarray(train.tokens), val.vocab_size)
    pset = prompt_set(val, num_prompts, prompt_tokens, new_tokens, tokenizer.bos_id)
    outputs = {"reference": pset.references}
    for name, model in models.items():
        outputs[name] = _continue(
            model, tokenizer, pset.prompts, new_tokens, temperature=temperature, num_samples=num_samples, seed=seed
        )
    results = {}
    for name, conts in outputs.items():
        auc, se, _ = retrieval_auc(retrieval_scores(pset.prompts, conts, background, beta))
        results[name] = {"auc": auc, "auc_se": se, "mean_new_tokens": float(np.mean([len(c) for c in conts]))}
    shown = np.linspace(0, len(pset.prompts) - 1, min(examples, len(pset.prompts))).round().astype(int)
    return {
        "settings": {
            "data": str(data_dir),
            "prompts": len(pset.prompts),
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "temperature": temperature,
            "num_samples": num_samples,
            "seed": seed,
            "beta": beta,
        },
        "results": results,
        "examples": [
            {"prompt": tokenizer.decode(pset.prompts[i]), **{k: tokenizer.decode(v[i]) for k, v in outputs.items()}}
            for i in shown.tolist()
        ],
    }


def format_table(result: dict[str, Any]) -> str:
    """The results of :func:`prompt_following` as aligned text lines (one per model, real text first)."""
    s = result["settings"]
    lines = [
        f"prompt retrieval AUC: {s['prompts']} validation prompts of {s['prompt_tokens']} tokens, "
        f"{s['new_tokens']} new tokens at T = {s['temperature']:g}, seed {s['seed']} (chance 0.5)"
    ]
    width = max(len(name) for name in result["results"])
    for name, r in result["results"].items():
        label = "real text" if name == "reference" else name
        lines.append(
            f"  {label:<{max(width, 9)}}  {r['auc']:.3f} ± {r['auc_se']:.3f}   ({r['mean_new_tokens']:.1f} new tokens)"
        )
    return "\n".join(lines)
