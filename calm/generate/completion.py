"""Text completion for serving and evaluation: one prompt in, text (streamed) out, with stop strings.

The layer between the language-model interface (:mod:`calm.generate.lm`) and the outside world (the
OpenAI-compatible server in ``calm/interop/serve.py`` and the lm-evaluation-harness model in
``calm/interop/lm_eval.py``). It knows no HTTP: it runs one completion, streams its text piece by
piece, cuts it at the first stop string, counts tokens and says why it finished. The model's own
rules (temperatures, N, sampler, the room in the context) are the interface's:
:meth:`~calm.generate.lm.LanguageModel.check_request` raises
:class:`~calm.generate.lm.LanguageModelError` before anything is generated.

A completion is exactly what ``generate_text`` returns for the same prompt, temperature, sampler,
``num_samples`` and seed (cut at the first stop string): generation stops at the end of a document
(BOS or EOS) and special tokens are never part of the text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from calm.generate.lm import LanguageModel
from calm.generate.sampling import SamplingStats


class _Halt(Exception):
    """Raised from inside a streaming callback to end generation early (stop string or cancel)."""


@dataclass
class CompletionResult:
    """One finished completion: the text (stop string excluded) and its accounting."""

    text: str
    finish_reason: str  # "stop" (end of document or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int  # BOS included
    completion_tokens: int  # tokens generated; when cut at a stop string, the returned text's tokens
    sampling: SamplingStats | None = None  # CALM: steps that fell back from the temperature asked


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
    """Completes text prompts with a :class:`~calm.generate.lm.LanguageModel` (see the module docstring).

    Not thread-safe: one completion at a time (the server runs them on one worker thread, so
    requests queue and never share a KV cache).
    """

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm

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
        raw_prompt: bool = False,
    ) -> CompletionResult:
        """Complete one prompt; ``emit`` receives the text as it is produced (stop strings held back).

        The text equals ``generate_text(model, tokenizer, [prompt], max_tokens, temperature=...,
        num_samples=..., sampler=..., seed=seed)[0]`` cut before the first stop string; generation
        ends as soon as a stop string appears. ``cancelled``, when set, ends generation at the next
        chunk (K tokens for CALM, one for the GPT) and returns the text so far. ``raw_prompt``: the
        prompt is not wrapped in a fine-tuned checkpoint's prompt template (a rendered chat). Raises
        :class:`~calm.generate.lm.LanguageModelError` for requests the model cannot serve.
        """
        num_prompt_ids = len(self.lm.encode_prompt(prompt, raw_prompt))
        scanner = StopScanner(stop, emit)

        def on_text(piece: str) -> None:
            if scanner.feed(piece) or (cancelled is not None and cancelled.is_set()):
                raise _Halt

        stats: list[SamplingStats] = []
        try:
            (result,) = self.lm.complete(
                [prompt],
                max_tokens,
                temperature=temperature,
                num_samples=num_samples,
                sampler=sampler,
                seed=seed,
                stream=on_text,
                stats=stats,
                raw_prompt=raw_prompt,
            )
        except _Halt:
            text = scanner.finish()
            sampling = stats[0] if stats else None
            return CompletionResult(text, "stop", num_prompt_ids, len(self.lm.tokenizer.encode(text)), sampling)
        text = scanner.finish()
        return CompletionResult(text, result.finish_reason, num_prompt_ids, len(result.token_ids), result.sampling)
