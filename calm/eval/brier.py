"""BrierLM drivers: per-position Brier-n estimates from CALM and token LMs, and data-set evaluation.

The estimators themselves are pure functions in ``calm.eval.brierlm``; this module runs models to get
the samples and probabilities they need (paper §5):

- **CALM, K ≥ 4** (paper §5 and the authors' code): one teacher-forced pass, two head samples per step decoded by the
  autoencoder; Brier-n from the first n tokens of each predicted chunk.
- **CALM, K < 4**: the accuracy term concatenates teacher-forced predictions of consecutive chunks
  (a match implies the later context was the ground truth); the collision term needs a real
  rollout, feeding sample 1's chunk back and drawing two fresh samples at each depth.
- **Token LMs** (paper §5): ``exact`` is the low-variance form (2·Π P(y) minus the exact last-step
  collision Σ P(x|path)² along a sampled path); ``two_sample`` is the pure sample form.

:func:`score_block` scores one block of any language model (``calm.generate.lm``: CALM or a token
LM, a local Hugging Face model included), so ``calm eval`` and the training validation need not ask
which kind they hold. Rollouts for every position of a block run together: the teacher-forced prefix is computed once
into a KV cache, then each rollout depth is one forward pass whose tokens attend to their own
prefix and chain only (a tree-shaped attention mask), so evaluation costs O(depth) passes rather
than O(positions).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from calm.data.corpus import iter_documents
from calm.data.evalsets import load_eval_documents, resolve_eval_data
from calm.eval.brierlm import BrierAccumulator, brier_exact_form, brier_two_sample
from calm.eval.diagnostics import head_diagnostics
from calm.generate.lm import CALMLanguageModel, LanguageModel, TokenLanguageModel, load_language_model
from calm.hardware import autocast, default_device, resolve_precision


def _rollout_mask(base_len: int, starts: torch.Tensor, depth: int) -> torch.Tensor:
    """Mask for depth-``depth`` chain tokens of the positions ``starts`` (G,) over the cache.

    Columns: the base prefix (base_len), then ``depth`` blocks of G chain tokens (earlier depths and
    this one). Row g sees base positions 0..starts[g] and its own chain tokens only.
    """
    G = starts.shape[0]
    base = torch.arange(base_len, device=starts.device)[None, :] <= starts[:, None]
    own = torch.eye(G, dtype=torch.bool, device=starts.device).repeat(1, depth)
    return torch.cat([base, own], dim=1)


def _groups(n: int, size: int) -> Iterable[torch.Tensor]:
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size))


@torch.no_grad()
def calm_block_brier(
    model: Any,
    block: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    n_max: int = 4,
    group_size: int = 512,
) -> torch.Tensor:
    """Brier-1..n estimates (P, n_max) for one block (1, T) of a CALM model (T a multiple of K).

    Scored start positions are the first tokens of chunks 1..L−1 (every K tokens), as in the
    official code; for K < n_max only chunks with ``ceil(n_max/K)`` chunks of future are scored.
    """
    K = model.chunk_size
    tokens = block.reshape(1, -1)
    L = tokens.shape[1] // K
    chunks = tokens[:, : L * K].view(1, L, K)
    S = L - 1  # input steps; h[t] predicts chunk t + 1
    span = math.ceil(n_max / K)
    depth = span - 1
    P = S - span + 1
    if P < 1:
        raise ValueError(f"block of {L} chunks is too short to score {n_max}-grams with K={K}")
    dev = chunks.device
    cache = model.new_cache(1, max_len=S + min(group_size, P) * depth) if depth else None
    h = model.hidden_states(chunks[:, :-1], cache)[0]  # (S, d)
    pred = model.draw_chunks(h, 2, generator)  # (2, S, K)
    target = chunks[0, 1:]  # (S, K)
    if depth == 0:
        return brier_two_sample(pred[0, :, :n_max], pred[1, :, :n_max], target[:, :n_max])
    # accuracy terms: teacher-forced predictions of consecutive chunks, read as one token stream
    windows = lambda x: x.reshape(-1).unfold(0, n_max, K)[:P]  # noqa: E731
    s1, s2, y = windows(pred[0]), windows(pred[1]), windows(target)
    # collision term: roll out along sample 1 and compare two fresh samples at every depth
    matches = [pred[0, :P] == pred[1, :P]]  # (P, K) at depth 0
    deeper: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    for group in _groups(P, group_size):
        group = group.to(dev)
        cache.length = S
        chain = pred[0, group]  # (G, K): sample 1's prediction of chunk t + 1
        for j in range(1, depth + 1):
            x = model.compress(chain[None])  # (1, G, d)
            hj = model.backbone(x, cache, positions=group + j, attn_mask=_rollout_mask(S, group, j))[0]
            pj = model.draw_chunks(hj, 2, generator)  # (2, G, K)
            deeper[j - 1].append(pj[0] == pj[1])
            chain = pj[0]
    coll_tokens = torch.cat([matches[0]] + [torch.cat(d) for d in deeper], dim=1)[:, :n_max]  # (P, n_max)
    acc1 = torch.cumprod((s1 == y).double(), dim=1)
    acc2 = torch.cumprod((s2 == y).double(), dim=1)
    return acc1 + acc2 - torch.cumprod(coll_tokens.double(), dim=1)


@torch.no_grad()
def token_lm_block_brier(
    step_logits: Callable[..., torch.Tensor],
    new_cache: Callable[[int], Any],
    block: torch.Tensor,
    *,
    mode: str = "exact",
    generator: torch.Generator | None = None,
    n_max: int = 4,
    group_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brier-1..n estimates (P, n_max) and target log-probs (T−1,) for one token block (1, T).

    ``step_logits(ids (1, t), cache, positions=None, attn_mask=None) -> logits (1, t, V)`` runs the
    model incrementally; ``new_cache(max_len)`` makes an empty cache. Every position t with
    n_max tokens of future is scored (``range(T − n_max)``, as the official code).
    """
    if mode not in ("exact", "two_sample"):
        raise ValueError(f"mode must be 'exact' or 'two_sample', got {mode!r}")
    ids = block.reshape(1, -1)
    S = ids.shape[1] - 1
    P = S - n_max + 1
    if P < 1:
        raise ValueError(f"block of {S + 1} tokens is too short to score {n_max}-grams")
    depth = n_max - 1
    dev = ids.device
    cache = new_cache(S + min(group_size, P) * depth)
    probs = torch.softmax(step_logits(ids[:, :-1], cache)[0].float(), dim=-1)  # (S, V)
    target = ids[0, 1:]
    logp_target = probs.gather(1, target[:, None])[:, 0].clamp_min(1e-30).log()
    y = target.unfold(0, n_max, 1)[:P]  # (P, n_max)
    sample = lambda p: torch.multinomial(p, 1, generator=generator)[:, 0]  # noqa: E731
    x1 = sample(probs[:P])
    x2 = sample(probs[:P])
    # collision along the path of sample 1: exact last-step collision (exact) or a sample pair
    coll = torch.zeros(P, n_max, dtype=torch.double, device=dev)
    coll_exact = torch.zeros(P, n_max, dtype=torch.double, device=dev)
    coll_exact[:, 0] = probs[:P].double().pow(2).sum(-1)
    coll[:, 0] = (x1 == x2).double()
    if depth:
        chain_cols: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        for group in _groups(P, group_size):
            group = group.to(dev)
            cache.length = S
            tok, other = x1[group], x2[group]
            same = (tok == other).double()
            for j in range(1, depth + 1):
                logits = step_logits(tok[None], cache, positions=group + j, attn_mask=_rollout_mask(S, group, j))
                pj = torch.softmax(logits[0].float(), dim=-1)
                a, b = sample(pj), sample(pj)
                chain_cols[j - 1].append((same, pj.double().pow(2).sum(-1), (a == b).double()))
                same = same * (a == b).double()
                tok = a
        for j in range(1, depth + 1):
            prev_same = torch.cat([c[0] for c in chain_cols[j - 1]])
            coll_exact[:, j] = prev_same * torch.cat([c[1] for c in chain_cols[j - 1]])
            coll[:, j] = prev_same * torch.cat([c[2] for c in chain_cols[j - 1]])
    if mode == "exact":
        p_y = probs[torch.arange(S, device=dev), target].unfold(0, n_max, 1)[:P].double()
        return brier_exact_form(p_y, coll_exact), logp_target
    t1 = sample(probs).unfold(0, n_max, 1)[:P]
    t2 = sample(probs).unfold(0, n_max, 1)[:P]
    acc1 = torch.cumprod((t1 == y).double(), dim=1)
    acc2 = torch.cumprod((t2 == y).double(), dim=1)
    return acc1 + acc2 - coll, logp_target


@torch.no_grad()
def gpt_block_brier(
    model: Any,
    block: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    mode: str = "exact",
    n_max: int = 4,
) -> torch.Tensor:
    """Brier-1..n estimates (P, n_max) for one block (1, T) of a GPT (:func:`token_lm_block_brier`)."""
    return score_block(TokenLanguageModel(model, None), block, generator=generator, mode=mode, n_max=n_max)[0]


@torch.no_grad()
def score_block(
    lm: LanguageModel,
    block: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    mode: str = "exact",
    n_max: int = 4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Brier-1..n estimates (P, n_max) for one block (1, T) of any language model, and the target
    log-probs (T−1,) of a token LM (None for CALM, which has no likelihood).

    CALM: :func:`calm_block_brier` (T a multiple of K; ``mode`` does not apply, its estimator is
    the sample form). Token LMs: :func:`token_lm_block_brier` in ``mode`` (exact | two_sample).
    """
    if isinstance(lm, TokenLanguageModel):
        return token_lm_block_brier(lm.step_logits, lm.new_cache, block, mode=mode, generator=generator, n_max=n_max)
    return calm_block_brier(lm.model, block, generator=generator, n_max=n_max), None


def make_blocks(docs: list[np.ndarray], block_tokens: int) -> np.ndarray:
    """HF group_texts: concatenate documents ([bos] + text, no EOS) and cut into full blocks."""
    stream = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
    n = len(stream) // block_tokens
    if n == 0:
        raise ValueError(
            f"evaluation text has {len(stream)} tokens, fewer than one block of {block_tokens}; "
            "use a shorter context or more text"
        )
    return stream[: n * block_tokens].reshape(n, block_tokens)


@torch.no_grad()
def evaluate_brier(
    lm: LanguageModel,
    blocks: np.ndarray,
    *,
    mode: str = "exact",
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    decode: Callable[[list[int]], str] | None = None,
) -> dict[str, Any]:
    """BrierLM over ``blocks`` (n, T) of token ids, one generator seeded with ``seed`` for all of them.

    Returns the Brier-n and BrierLM means with standard errors (``BrierAccumulator.summary``) and
    ``per_block``: each block's sum of per-position Brier-1..4 estimates (fractions) and its number of
    scored positions, so that two models scored on the same blocks can be compared with a paired
    standard error (``calm.eval.brierlm.ratio_of_means``). A token LM adds its cross-entropy ``ce``
    (nats per predicted token), ``perplexity`` and ``estimator`` (``mode``), and with ``decode``
    (ids -> text) ``bits_per_byte`` of the text after each block's first token.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    acc = BrierAccumulator()
    nll, n_pred, n_bytes = 0.0, 0, 0
    block_sums: list[list[float]] = []
    block_positions: list[int] = []
    lm.model.eval()
    for row in tqdm(blocks, desc=f"BrierLM {lm.kind}", disable=not progress):
        block = torch.as_tensor(row, dtype=torch.long, device=device)[None]
        est, logp = score_block(lm, block, mode=mode, generator=gen)
        acc.add(est)
        block_sums.append(est.double().sum(0).tolist())
        block_positions.append(int(est.shape[0]))
        if logp is not None:
            nll -= float(logp.sum())
            n_pred += logp.numel()
            if decode is not None:
                n_bytes += len(decode(row[1:].tolist()).encode("utf-8"))
    out: dict[str, Any] = dict(acc.summary())
    out["per_block"] = {"sums": block_sums, "positions": block_positions}
    if lm.has_likelihood:
        out["ce"] = nll / max(n_pred, 1)
        out["perplexity"] = math.exp(out["ce"])
        if decode is not None:
            out["bits_per_byte"] = nll / math.log(2) / max(n_bytes, 1)
        out["estimator"] = mode
    return out


def _hf_adapter(path: str, device: torch.device | str) -> tuple[Any, Any, Callable[..., torch.Tensor], Callable]:
    """A local Hugging Face causal LM behind the same incremental interface as our GPT.

    The cache is a ``transformers.DynamicCache`` used through its public interface only: it is
    passed as ``cache=`` (the name since transformers 5.x; older versions call it
    ``past_key_values``, chosen from the model's signature), read with ``get_seq_length()``, and
    shortened with ``crop(-n)``, which removes the last n positions in every version (a positive
    argument, "keep this many", was dropped in transformers 5). A rollout group appends its chain
    tokens after the teacher-forced prefix; the next group first crops them away again.
    """
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    except ImportError as e:
        raise ImportError("--hf-model needs the optional extra: pip install 'calm-lm[hf]'") from e
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
    hf_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    if cache_kwarg not in params:
        raise ValueError(
            f"{type(model).__name__}.forward (transformers {transformers.__version__}) takes neither `cache` nor "
            "`past_key_values`; --hf-model needs a causal LM with a KV cache"
        )

    class _Cache:
        def __init__(self) -> None:
            self.kv = DynamicCache()
            self.length = 0
            self.base: int | None = None

    def step(
        ids: torch.Tensor,
        cache: _Cache,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = ids.shape[1]
        if cache.base is not None and cache.length == cache.base:
            extra = cache.kv.get_seq_length() - cache.base
            if extra > 0:
                cache.kv.crop(-extra)  # a new rollout group: drop the previous group's chain tokens
        past = cache.kv.get_seq_length()
        if positions is None:
            positions = torch.arange(past, past + T, device=ids.device)
        if attn_mask is None:
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=ids.device).tril(diagonal=past)
        mask4 = torch.zeros(1, 1, T, past + T, device=ids.device, dtype=model.dtype)
        mask4.masked_fill_(~attn_mask[None, None], torch.finfo(model.dtype).min)
        out = model(
            input_ids=ids,
            position_ids=positions[None],
            attention_mask=mask4,
            use_cache=True,
            **{cache_kwarg: cache.kv},
        )
        cache.length = past + T
        if cache.base is None:
            cache.base = cache.length
        return out.logits

    return model, hf_tok, step, lambda n: _Cache()


class _HFLanguageModel(TokenLanguageModel):
    """A local Hugging Face causal LM as a token LM, for BrierLM scoring only (``calm eval --hf-model``)."""

    kind = "hf"

    def __init__(self, path: str, device: torch.device | str) -> None:
        model, hf_tok, self._step, self._new_cache = _hf_adapter(path, device)
        super().__init__(model, hf_tok)

    @property
    def context_steps(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def step_logits(
        self,
        ids: torch.Tensor,
        cache: Any,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._step(ids, cache, positions, attn_mask)

    def new_cache(self, max_len: int) -> Any:
        return self._new_cache(max_len)


def _hf_documents(hf_tok: Any, data: str) -> list[np.ndarray]:
    """The evaluation text in a Hugging Face tokenizer's ids: [BOS (if it has one)] + text, per document."""
    bos = [hf_tok.bos_token_id] if hf_tok.bos_token_id is not None else []
    return [
        np.asarray(bos + hf_tok.encode(t, add_special_tokens=False)) for t in iter_documents([resolve_eval_data(data)])
    ]


def _context_blocks(
    tokens_per_step: int, max_steps: int, steps: int | None, tokens: int | None
) -> tuple[int, dict[str, Any]]:
    """(block length in tokens, its description) for ``--context-tokens`` / ``--context-steps``."""
    if tokens is not None:
        block = tokens - tokens % tokens_per_step
        return block, {
            "unit": "tokens",
            "tokens": block,
            "description": f"{block} tokens per block (same for every model)",
        }
    steps = steps or max_steps
    block = steps * tokens_per_step
    return block, {
        "unit": "steps",
        "steps": steps,
        "tokens": block,
        "description": f"{steps} backbone steps per block ({block} tokens; paper protocol)",
    }


def evaluate_checkpoint(
    checkpoint: str | None,
    data: str,
    *,
    hf_model: str | None = None,
    context_steps: int | None = None,
    context_tokens: int | None = None,
    mode: str = "exact",
    seed: int = 0,
    max_blocks: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    precision: str = "auto",
    diagnostic_positions: int = 2048,
    head_steps: int | None = None,
) -> dict[str, Any]:
    """``calm eval``: BrierLM ± SE of a checkpoint (or a local HF model) on a text file or data dir.

    ``head_steps`` sets a flow / diffusion head's sampling steps (``calm.models.heads.with_sampling_steps``).

    ``max_tokens`` evaluates only the blocks within the first that many tokens of the text, so
    models with different block lengths are scored on the same text. ``precision`` (auto | fp32 |
    bf16) is resolved by ``calm.hardware`` and recorded in the result; the estimators themselves
    always accumulate in fp32. For CALM checkpoints the result also holds ``head_diagnostics``
    (``calm.eval.diagnostics``: conditioning gap, noise floor, marginal distance, gap closed, next-chunk
    accuracies) on at most ``diagnostic_positions`` evenly spread positions of the same blocks (0
    skips them).
    """
    device = device or default_device()
    precision = resolve_precision(precision, device)
    if (checkpoint is None) == (hf_model is None):
        raise ValueError("pass exactly one of --checkpoint or --hf-model")
    lm: LanguageModel
    if hf_model is not None:
        lm = _HFLanguageModel(hf_model, device)
        docs = _hf_documents(lm.tokenizer, data)
        decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        name = hf_model
    else:
        lm = load_language_model(checkpoint, device)
        if head_steps is not None:
            lm.set_head_steps(head_steps)
        docs = load_eval_documents(data, lm.tokenizer)
        decode = lm.tokenizer.decode
        name = str(checkpoint)
    K = lm.tokens_per_step
    block, context = _context_blocks(K, lm.context_steps, context_steps, context_tokens)
    steps_needed = block // K - 1  # the last step (chunk or token) of a block is only predicted
    if steps_needed > lm.context_steps:
        raise ValueError(_context_error(lm.context_steps, K, context_steps, context_tokens))
    blocks = make_blocks(docs, block)
    notes = []
    if max_tokens:
        blocks = blocks[: max(1, max_tokens // block)]
        if blocks.size != max_tokens:
            notes.append(f"--max-tokens {max_tokens:,} scores {blocks.size:,} tokens: whole blocks of {block:,} tokens")
    if max_blocks:
        blocks = blocks[:max_blocks]
    with autocast(device, precision):
        result = evaluate_brier(lm, blocks, mode=mode, seed=seed, device=device, progress=progress, decode=decode)
        has_positions = blocks.shape[0] * (blocks.shape[1] // K - 1) >= 2
        if isinstance(lm, CALMLanguageModel) and diagnostic_positions and has_positions:
            diag = head_diagnostics(lm.model, blocks, max_positions=diagnostic_positions, seed=seed)
            result["head_diagnostics"] = diag.as_dict()
    result.update(
        {
            "model": name,
            "kind": lm.kind,
            "data": str(data),
            "seed": seed,
            "precision": precision,
            "context": context,
            **({"head": lm.model.config.head, "head_steps": head_steps} if head_steps is not None else {}),
            "blocks": int(len(blocks)),
            "tokens": int(blocks.size),
            **({"notes": notes} if notes else {}),
        }
    )
    return result


def _context_error(model_steps: int, tokens_per_step: int, steps: int | None, tokens: int | None) -> str:
    """What to pass instead of a context longer than the model's, in the units the user gave it."""
    longest = (model_steps + 1) * tokens_per_step  # the last step of a block is only predicted
    model = f"the model attends over {model_steps:,} steps of {tokens_per_step} token(s)"
    if tokens is not None:
        return f"--context-tokens {tokens:,} is more than {model}; pass --context-tokens {longest:,} or less"
    return f"--context-steps {steps:,} is more than {model}; pass --context-steps {model_steps:,} or less"
