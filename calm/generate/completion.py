"""Text completion for serving and evaluation: one prompt in, text (streamed) out, with stop strings.

The layer between the language-model interface (:mod:`calm.generate.lm`) and the outside world (the
OpenAI-compatible server in ``calm/interop/serve.py`` and the lm-evaluation-harness model in
``calm/interop/lm_eval.py``). It knows no HTTP: it turns a prompt into a sequence for continuous
batching (:mod:`calm.generate.batching`; the server runs every request in flight in one batch) and
the sequence's tokens into text, streamed piece by piece, cut at the first stop string, with its token
counts and why it finished. The model's own
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
from typing import Any

from calm.generate.batching import Batcher, SequenceResult
from calm.generate.batching import Sequence as BatchSequence
from calm.generate.lm import LanguageModel, TextStream
from calm.generate.sampling import SamplingStats


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


class TextSink:
    """One sequence's tokens -> its streamed text, cut at the first stop string (see :class:`TextCompleter`).

    The text is decoded from all tokens so far and sent on once it does not end inside a multi-byte
    character, exactly as :meth:`~calm.generate.lm.LanguageModel.complete` streams it; a
    :class:`StopScanner` holds back what could start a stop string.
    """

    def __init__(
        self,
        lm: LanguageModel,
        stop: Sequence[str],
        emit: Callable[[str], None] | None,
        cancelled: threading.Event | None,
        num_prompt_ids: int,
    ) -> None:
        self.lm, self.cancelled, self.num_prompt_ids = lm, cancelled, num_prompt_ids
        self.scanner = StopScanner(stop, emit)
        self.text = TextStream(lm)

    def feed(self, tokens: list[int]) -> bool:
        """Take new tokens; False once a stop string appeared or the request was cancelled (stop generating)."""
        piece = self.text.feed(tokens)
        if piece is not None and self.scanner.feed(piece):
            return False
        return not (self.cancelled is not None and self.cancelled.is_set())

    def result(self, done: SequenceResult) -> CompletionResult:
        """The completion of a finished sequence: its text (stop string excluded) and accounting."""
        halted = done.halted or self.scanner.stopped
        if not halted:
            rest = self.text.rest(self.lm.decode_text(done.token_ids))
            halted = bool(rest) and self.scanner.feed(rest)
        text = self.scanner.finish()
        if halted:  # cut at a stop string (or cancelled): count the tokens of the text returned
            tokens = len(self.lm.tokenizer.encode(text))
            return CompletionResult(text, "stop", self.num_prompt_ids, tokens, done.sampling)
        reason = "stop" if done.stopped else "length"
        return CompletionResult(text, reason, self.num_prompt_ids, len(done.token_ids), done.sampling)


class TextCompleter:
    """Completes text prompts with a :class:`~calm.generate.lm.LanguageModel` (see the module docstring).

    :meth:`prepare` turns a request into a :class:`~calm.generate.batching.Sequence` for a
    :class:`~calm.generate.batching.Batcher` (the server batches every request it is serving) and the
    :class:`TextSink` that turns its result into a :class:`CompletionResult`; :meth:`complete` runs one
    prompt to the end on the calling thread.
    """

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm

    def prepare(
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
    ) -> tuple[BatchSequence, TextSink]:
        """The sequence to decode for one prompt and the sink that makes its text.

        The text equals ``generate_text(model, tokenizer, [prompt], max_tokens, temperature=...,
        num_samples=..., sampler=..., seed=seed)[0]`` cut before the first stop string (``stop``, at most
        a few strings); generation ends as soon as a stop string appears. ``emit`` receives the text as
        it is produced (stop strings held back). ``cancelled``, when set, ends generation at the next
        chunk (K tokens for CALM, one for the GPT) with the text so far. ``raw_prompt``: the prompt is not
        wrapped in a fine-tuned checkpoint's prompt template (a rendered chat). Raises
        :class:`~calm.generate.lm.LanguageModelError` for a request the model cannot serve.
        """
        lm = self.lm
        ids = lm.encode_prompt(prompt, raw_prompt)
        lm.check_request(len(ids), max_tokens, temperature=temperature, num_samples=num_samples, sampler=sampler)
        sink = TextSink(lm, stop, emit, cancelled, len(ids))
        seq = BatchSequence(
            ids, max_tokens, temperature=temperature, num_samples=num_samples, sampler=sampler, seed=seed,
            stop_ids=lm.stop_ids(), on_tokens=sink.feed, cancelled=cancelled,
        )  # fmt: skip
        return seq, sink

    def complete(self, prompt: str, max_tokens: int, **options: Any) -> CompletionResult:
        """Complete one prompt on the calling thread; ``options`` are the keywords of :meth:`prepare` (the
        temperature, stop strings, seed, N, sampler, ``emit``, ``cancelled``, ``raw_prompt``)."""
        seq, sink = self.prepare(prompt, max_tokens, **options)
        (done,) = Batcher(self.lm, max_batch=1).run([seq])
        return sink.result(done)
