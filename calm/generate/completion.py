"""Text completion for serving and evaluation: one prompt in, text (streamed) out, with stop strings.

The layer between the generation loops and the outside world (the OpenAI-compatible server in
``calm/interop/serve.py`` and the lm-evaluation-harness model in ``calm/interop/lm_eval.py``). It knows no
HTTP: it checks a request against the model's context, runs one completion, streams its text
piece by piece, cuts it at the first stop string, counts tokens and says why it finished.

Both kinds go through :func:`calm.generate.engine.complete`, so a completion is exactly what
``generate_text`` returns for the same prompt, temperature, sampler, ``num_samples`` and seed (cut
at the first stop string): generation stops at the end of a document (BOS or EOS) and special
tokens are never part of the text.

- **CALM**: K tokens per step, likelihood-free temperature (CALM-SPEC §5.3); temperature must be
  in (0, 1].
- **GPT** (the token-level baseline, §6): softmax sampling, or greedy decoding at temperature 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from calm.generate.engine import complete

#: Largest temperature accepted for the GPT (OpenAI's range is [0, 2]).
GPT_MAX_TEMPERATURE = 2.0


class CompletionError(ValueError):
    """A request that cannot be completed as asked (the message says what to change)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Halt(Exception):
    """Raised from inside a streaming callback to end generation early (stop string or cancel)."""


@dataclass
class CompletionResult:
    """One finished completion: the text (stop string excluded) and its accounting."""

    text: str
    finish_reason: str  # "stop" (end of document or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int  # BOS included
    completion_tokens: int  # tokens generated; when cut at a stop string, the returned text's tokens


class StopScanner:
    """Streams text while holding back what could be the start of a stop string.

    ``feed`` returns True once a stop string has appeared; the text is then cut before its first
    occurrence. Up to ``max(len(stop)) - 1`` characters are held back until they can no longer
    begin a stop string; ``finish`` releases them.
    """

    def __init__(self, stops: Sequence[str], emit: Callable[[str], None] | None = None) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emit = emit
        self.text = ""
        self.sent = 0
        self.stopped = False

    def _send(self, end: int) -> None:
        if end > self.sent:
            if self.emit is not None:
                self.emit(self.text[self.sent : end])
            self.sent = end

    def feed(self, piece: str) -> bool:
        if self.stopped:
            return True
        start = max(0, len(self.text) - self.hold)  # a new match must end inside the new piece
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            self._send(len(self.text))
            return True
        self._send(len(self.text) - self.hold)
        return False

    def finish(self) -> str:
        self._send(len(self.text))
        return self.text


class TextCompleter:
    """Completes text prompts with a loaded CALM or GPT checkpoint (see the module docstring).

    Not thread-safe: one completion at a time (the server runs them on one worker thread, so
    requests queue and never share a KV cache).

    Args:
        model: a ``CALM`` or ``GPT`` in eval mode (from :func:`calm.checkpoint.load_model`).
        tokenizer: the checkpoint's :class:`calm.data.tokenizer.Tokenizer`.
        kind: ``"calm"`` or ``"gpt"`` (the checkpoint config's ``kind``).
    """

    def __init__(self, model: Any, tokenizer: Any, kind: str) -> None:
        if kind not in ("calm", "gpt"):
            raise CompletionError(f"cannot complete text with a {kind!r} checkpoint; pass a CALM or GPT checkpoint")
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind

    @property
    def context_tokens(self) -> int:
        """Most tokens (prompt with BOS + completion) one sequence can hold."""
        steps = self.model.config.max_seq_len
        return steps * self.model.chunk_size if self.kind == "calm" else steps

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids the model is conditioned on: BOS + the prompt's tokens."""
        return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)

    def max_new_tokens(self, num_prompt_ids: int) -> int:
        """Most tokens that fit after a prompt of ``num_prompt_ids`` ids (BOS included); may be <= 0."""
        if self.kind == "gpt":
            return self.model.config.max_seq_len - num_prompt_ids
        K = self.model.chunk_size
        # generate() needs prompt_chunks + new_chunks - 1 <= max_seq_len (the last chunk is never fed back).
        return (self.model.config.max_seq_len + 1 - -(-num_prompt_ids // K)) * K

    def check(self, num_prompt_ids: int, max_tokens: int, temperature: float, num_samples: int = 1) -> None:
        """Raise :class:`CompletionError` if a request cannot run on this model as asked."""
        if max_tokens < 1:
            raise CompletionError(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if self.kind == "calm":
            if not 0.0 < temperature <= 1.0:
                raise CompletionError(
                    f"temperature must be in (0, 1] for CALM, got {temperature}: likelihood-free sampling can "
                    "only sharpen the model's distribution (1 = plain sampling, 0.5 = sharper)",
                    "temperature",
                )
            if num_samples < 1:
                raise CompletionError(f"num_samples must be >= 1, got {num_samples}", "num_samples")
        elif not 0.0 <= temperature <= GPT_MAX_TEMPERATURE:
            raise CompletionError(
                f"temperature must be in [0, {GPT_MAX_TEMPERATURE:g}] for the GPT, got {temperature}", "temperature"
            )
        room = self.max_new_tokens(num_prompt_ids)
        if max_tokens > room:
            raise CompletionError(
                f"the prompt is {num_prompt_ids} tokens (BOS included) and max_tokens is {max_tokens}, but the "
                f"model's context is {self.context_tokens} tokens, which leaves room for at most {max(room, 0)} new "
                "tokens; shorten the prompt or lower max_tokens",
                "max_tokens" if room >= 1 else "prompt",
            )

    def complete(
        self,
        prompt: str,
        max_tokens: int,
        *,
        temperature: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        num_samples: int = 200,
        sampler: str = "batch",
        emit: Callable[[str], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> CompletionResult:
        """Complete one prompt; ``emit`` receives the text as it is produced (stop strings held back).

        The text equals ``generate_text(model, tokenizer, [prompt], max_tokens, temperature=...,
        num_samples=..., sampler=..., seed=seed)[0]`` cut before the first stop string; generation
        ends as soon as a stop string appears. ``cancelled``, when set, ends generation at the next
        chunk (K tokens for CALM, one for the GPT) and returns the text so far. Raises
        :class:`CompletionError` for requests that do not fit the model (see :meth:`check`).
        """
        num_prompt_ids = len(self.prompt_ids(prompt))
        self.check(num_prompt_ids, max_tokens, temperature, num_samples)
        scanner = StopScanner(stop, emit)

        def on_text(piece: str) -> None:
            if scanner.feed(piece) or (cancelled is not None and cancelled.is_set()):
                raise _Halt

        try:
            (result,) = complete(
                self.model,
                self.tokenizer,
                [prompt],
                max_tokens,
                temperature=temperature,
                num_samples=num_samples,
                sampler=sampler,
                seed=seed,
                stream=on_text,
            )
        except _Halt:
            text = scanner.finish()
            return CompletionResult(text, "stop", num_prompt_ids, len(self.tokenizer.encode(text)))
        text = scanner.finish()
        return CompletionResult(text, result.finish_reason, num_prompt_ids, len(result.token_ids))
