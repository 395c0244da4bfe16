"""Continuous batching: sequences decoded together, joining and leaving between steps, each giving exactly
what it gives alone (``LanguageModel.complete`` with the same seed), for both samplers and both model kinds."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from calm.generate.batching import Batcher, Sequence
from calm.generate.lm import load_language_model

PROMPTS = ["The river crossed", "In 1933 the hurricane struck", "A", "The orchestra played the"]

CALM_SETTINGS = [  # (temperature, sampler, num_samples, seed)
    (1.0, "batch", 200, 0),
    (1.0, "batch", 200, 1),
    (0.5, "batch", 16, 2),
    (0.5, "batch", 16, 3),
    (0.25, "batch", 64, 4),
    (0.5, "exact", 1, 5),
    (1 / 3, "exact", 1, 6),
    (0.6, "exact", 1, 7),  # 1/T not an integer: the exact sampler's stage-2 uniforms come from the seed too
]
GPT_SETTINGS = [(0.0, "batch", 1, 0), (1.0, "batch", 1, 1), (0.7, "batch", 1, 2), (1.5, "batch", 1, 3)]


def alone(lm, prompt: str, max_new: int, temperature: float, sampler: str, num_samples: int, seed: int) -> list[int]:
    (done,) = lm.complete(
        [prompt], max_new, temperature=temperature, num_samples=num_samples, sampler=sampler, seed=seed
    )
    return done.token_ids


def sequences(lm, settings, max_new: int) -> list[Sequence]:
    return [
        Sequence(
            lm.encode_prompt(PROMPTS[i % len(PROMPTS)]),
            max_new - (i % 3),
            temperature=t,
            sampler=sampler,
            num_samples=n,
            seed=seed,
            stop_ids=lm.stop_ids(),
        )  # fmt: skip
        for i, (t, sampler, n, seed) in enumerate(settings)
    ]


@pytest.mark.parametrize("kind", ["calm", "gpt"])
def test_a_batch_of_mixed_requests_gives_each_its_own_result(tiny_lm_checkpoints: dict[str, Path], kind: str) -> None:
    lm = load_language_model(tiny_lm_checkpoints[kind])
    settings, max_new = (CALM_SETTINGS, 20) if kind == "calm" else (GPT_SETTINGS, 10)
    seqs = sequences(lm, settings, max_new)
    steps: list[int] = []
    results = Batcher(lm, on_step=steps.append).run(seqs)
    for seq, (t, sampler, n, seed), got in zip(seqs, settings, results, strict=True):
        prompt = lm.tokenizer.decode(seq.prompt_ids[1:])
        want = alone(lm, prompt, seq.max_new_tokens, t, sampler, n, seed)
        assert got.token_ids == want, (t, sampler, seed)
        assert got.stopped == (len(want) < seq.max_new_tokens)
    assert max(steps) > 1  # they really ran as one batch (a row that ends at its first token never steps)
    if kind == "calm":
        assert all(r.sampling is not None and r.sampling.steps > 0 for r in results)


def test_sequences_that_join_and_leave_mid_way_are_unaffected(tiny_lm_checkpoints: dict[str, Path]) -> None:
    """A batch capped at 3 rows: later sequences wait for a free row and join while others are mid-way."""
    lm = load_language_model(tiny_lm_checkpoints["calm"])
    settings = [(1.0, "batch", 200, s) for s in range(4)] + [(0.5, "batch", 16, s) for s in range(4, 7)]
    seqs = sequences(lm, settings, 24)
    sizes: list[int] = []
    results = Batcher(lm, max_batch=3, on_step=sizes.append).run(seqs)
    for seq, (t, sampler, n, seed), got in zip(seqs, settings, results, strict=True):
        prompt = lm.tokenizer.decode(seq.prompt_ids[1:])
        assert got.token_ids == alone(lm, prompt, seq.max_new_tokens, t, sampler, n, seed)
    assert max(sizes) == 3


def test_on_tokens_false_and_cancel_end_a_row_and_the_others_go_on(tiny_lm_checkpoints: dict[str, Path]) -> None:
    lm = load_language_model(tiny_lm_checkpoints["gpt"])
    cancelled = threading.Event()
    seen: list[list[int]] = []
    seqs = sequences(lm, GPT_SETTINGS[1:4], 10)
    seqs[0].on_tokens = lambda tokens: seen.append(tokens) or len(seen) < 2  # ends after its second token
    seqs[1].cancelled = cancelled
    seqs[1].on_tokens = lambda tokens: cancelled.set()
    results = Batcher(lm).run(seqs)
    assert results[0].halted and len(results[0].token_ids) == 2
    assert results[1].halted and len(results[1].token_ids) == 1
    assert not results[2].halted
    assert results[2].token_ids == alone(lm, PROMPTS[2], seqs[2].max_new_tokens, *GPT_SETTINGS[3])


def test_a_failing_callback_fails_its_own_sequence_only(tiny_lm_checkpoints: dict[str, Path]) -> None:
    lm = load_language_model(tiny_lm_checkpoints["gpt"])
    seqs = sequences(lm, GPT_SETTINGS[:2], 8)

    def boom(tokens: list[int]) -> bool:
        raise RuntimeError("the client's callback broke")

    seqs[0].on_tokens = boom
    batcher = Batcher(lm)
    futures = [batcher.submit(s) for s in seqs]
    while batcher.active or batcher.waiting:
        batcher.step()
    with pytest.raises(RuntimeError, match="callback broke"):
        futures[0].result()
    assert futures[1].result().token_ids == alone(lm, PROMPTS[1], seqs[1].max_new_tokens, 1.0, "batch", 1, 1)


def test_the_worker_thread_serves_submissions_until_closed(tiny_lm_checkpoints: dict[str, Path]) -> None:
    lm = load_language_model(tiny_lm_checkpoints["calm"])
    batcher = Batcher(lm)
    batcher.start()
    futures = [batcher.submit(s) for s in sequences(lm, CALM_SETTINGS[:3], 12)]
    results = [f.result(timeout=60) for f in futures]
    batcher.close()
    assert all(len(r.token_ids) > 0 or r.stopped for r in results)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(sequences(lm, CALM_SETTINGS[:1], 4)[0])
    assert torch.is_tensor(batcher.cache.lengths)


def test_a_sequence_that_does_not_fit_is_refused_at_once(tiny_lm_checkpoints: dict[str, Path]) -> None:
    from calm.generate.lm import LanguageModelError

    lm = load_language_model(tiny_lm_checkpoints["gpt"])
    with pytest.raises(LanguageModelError, match="context"):
        Batcher(lm).submit(Sequence(lm.encode_prompt(PROMPTS[1]), 40))
