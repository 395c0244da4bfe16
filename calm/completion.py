"""Text completion for serving and evaluation: one prompt in, text (streamed) out, with stop strings.

The layer between the generation loops and the outside world (the OpenAI-compatible server in
``calm/serve.py`` and the lm-evaluation-harness model in ``calm/lm_eval_model.py``). It knows no
HTTP: it checks a request against the model's context, runs one completion, streams its text
piece by piece, cuts it at the first stop string, counts tokens and says why it finished.

- **CALM** goes through :func:`calm.generate.generate_text` (K tokens per step, likelihood-free
  temperature, CALM-SPEC §5.3), so a completion is exactly what ``generate_text`` returns for the
  same prompt, temperature, sampler, ``num_samples`` and seed. Temperature must be in (0, 1].
- **GPT** (the token-level baseline, §6) goes through ``GPT.generate``: softmax sampling, or
  greedy decoding at temperature 0.

Generation stops at EOS (and, for the GPT, at a BOS that would start a new document); special
tokens are never part of the text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from calm.generate import generate_text

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
class Completion:
    """One finished completion: the text (stop string excluded) and its accounting."""

    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int  # BOS included
    completion_tokens: int  # tokens generated, up to the stop


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
        tokenizer: the checkpoint's :class:`calm.tokenizer.Tokenizer`.
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
    ) -> Completion:
        """Complete one prompt; ``emit`` receives the text as it is produced (stop strings held back).

        For CALM the result equals ``generate_text(model, tokenizer, [prompt], max_tokens, ...,
        seed=seed)[0]`` cut at the first stop string. ``cancelled``, when set, ends generation at the
        next chunk (the text so far is returned). Raises :class:`CompletionError` for requests that
        do not fit the model (see :meth:`check`).
        """
        num_prompt_ids = len(self.prompt_ids(prompt))
        self.check(num_prompt_ids, max_tokens, temperature, num_samples)
        scanner = StopScanner(stop, emit)
        counted = [0]

        def on_text(piece: str) -> None:
            if scanner.feed(piece) or (cancelled is not None and cancelled.is_set()):
                raise _Halt

        def on_ids(ids: list[int]) -> None:
            counted[0] += len(ids)

        try:
            if self.kind == "calm":
                generate_text(
                    self.model,
                    self.tokenizer,
                    [prompt],
                    max_tokens,
                    temperature=temperature,
                    num_samples=num_samples,
                    sampler=sampler,
                    seed=seed,
                    stream=on_text,
                    on_tokens=lambda row, ids: on_ids(ids),
                )
            else:
                self._complete_gpt(prompt, max_tokens, temperature, seed, on_text, on_ids)
            finish = "length" if counted[0] >= max_tokens else "stop"
        except _Halt:
            finish = "stop"
        text = scanner.finish()
        return Completion(text, finish, num_prompt_ids, counted[0])

    def _complete_gpt(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        on_text: Callable[[str], None],
        on_ids: Callable[[list[int]], None],
    ) -> None:
        """Token-by-token GPT decoding that streams text and stops at EOS or a new document's BOS."""
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
        produced: list[int] = []
        printed = [""]

        def flush() -> None:
            text = tok.decode(produced)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                piece, printed[0] = text[len(printed[0]) :], text
                on_text(piece)

        def on_token(ids: torch.Tensor) -> None:
            token = int(ids[0])
            if token in (tok.eos_id, tok.bos_id):
                raise _EndOfDocument
            produced.append(token)
            on_ids([token])
            flush()

        ids = torch.tensor([self.prompt_ids(prompt)], device=device)
        try:
            self.model.generate(ids, max_tokens, temperature=temperature, generator=generator, on_token=on_token)
        except _EndOfDocument:
            pass
        text = tok.decode(produced)
        if len(text) > len(printed[0]):
            on_text(text[len(printed[0]) :])


class _EndOfDocument(Exception):
    """The GPT sampled EOS or BOS: the document is over."""
