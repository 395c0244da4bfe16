"""Continuous batching: many sequences decoded in one backbone step each, joining and leaving between steps.

A server decoding one request at a time leaves most of the hardware idle: each step is a handful of
matrix-vector products, bound by reading the weights. :class:`Batcher` keeps every active sequence
in one batch instead. Each iteration it

1. **admits** waiting sequences (up to ``max_batch`` active): each prompt is prefilled alone, exactly
   as it would be decoded alone (CALM: left-padded with BOS to a multiple of K, ``calm.generate.engine``),
   and its keys and values join a :class:`~calm.models.layers.RowKVCache` as a new row;
2. **samples** the next chunk (CALM, K tokens) or token (the GPT) of every row. CALM rows that share
   a temperature, sampler and N run through the head and the autoencoder's vocabulary search in one
   call (``calm.generate.engine.sample_step``: N head samples per row, Alg. 2's lazy decode, or the
   exact sampler's draws row by row); the GPT samples each row's softmax at its own temperature;
3. **retires** the rows that ended (a stop token, ``max_new_tokens``, a stop string or a cancel seen
   by ``on_tokens``, ``cancelled``);
4. **steps the backbone once** for all remaining rows, each at its own position.

Every random draw of a sequence comes from its own generator (seeded from its ``seed``;
``calm.models.rng``), drawn in the order it is drawn alone, so a sequence's tokens equal those of
:meth:`calm.generate.lm.LanguageModel.complete` on its prompt alone with the same seed, up to the
rounding of batched matmuls (a token near a tie could flip; we have not seen one in the tests).
Batching is ours, not the paper's; the paper's inference claim (K tokens per step) is about this
regime, where the step's cost is compute rather than weight reads.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from calm.generate.engine import keep_chunk, left_pad_to_chunks, sample_step
from calm.generate.lm import LanguageModel
from calm.generate.sampling import SamplingStats
from calm.models.gpt import sample_tokens
from calm.models.layers import KVCache, RowKVCache

DEFAULT_MAX_BATCH = 32
"""Sequences decoded together at most (``calm serve --max-batch``); more wait for a free row."""


@dataclass
class Sequence:
    """One prompt to continue, with its own sampling settings (the rules: ``LanguageModel.check_request``)."""

    prompt_ids: list[int]
    """The prompt's ids, BOS first (``LanguageModel.encode_prompt``)."""
    max_new_tokens: int
    temperature: float = 1.0
    num_samples: int = 200
    sampler: str = "batch"
    seed: int | None = None
    """Seeds the sequence's own generator; None: fresh entropy."""
    stop_ids: frozenset[int] = frozenset()
    """Tokens that end the sequence (excluded from it), e.g. BOS and EOS."""
    on_tokens: Callable[[list[int]], bool] | None = None
    """Called on the worker with each non-empty piece of new tokens; returning False ends the sequence."""
    cancelled: threading.Event | None = None
    """When set, the sequence ends before its next step (client gone, timeout, shutdown)."""


@dataclass
class SequenceResult:
    """A finished sequence: its new ids (stop token excluded), and why it ended."""

    token_ids: list[int]
    stopped: bool
    """It ended at a token of ``stop_ids``."""
    halted: bool
    """``on_tokens`` returned False or ``cancelled`` was set."""
    sampling: SamplingStats | None
    """CALM: how often its steps fell back from the temperature asked; None for a token model."""
    started: float = 0.0
    """``time.perf_counter()`` when it joined the batch (its prefill began)."""


@dataclass
class _Row:
    seq: Sequence
    future: Future
    generator: torch.Generator
    stats: SamplingStats | None
    state: torch.Tensor | None = None  # (1, d) last hidden state (CALM) or (1, V) next-token logits (GPT)
    sampled: list[int] = field(default_factory=list)  # the last chunk or token drawn, whole: the next input
    out: list[int] = field(default_factory=list)
    done: bool = False
    stopped: bool = False
    halted: bool = False
    started: float = 0.0

    def result(self) -> SequenceResult:
        return SequenceResult(self.out, self.stopped, self.halted, self.stats, self.started)


class Batcher:
    """Continuous batching over a :class:`~calm.generate.lm.LanguageModel` (module docstring).

    :meth:`submit` queues a :class:`Sequence` and returns a ``Future`` of its :class:`SequenceResult`
    (thread-safe). Either :meth:`start` a worker thread that serves submissions until :meth:`close`,
    or call :meth:`run` to decode given sequences on the calling thread. ``on_step(rows)``, if given,
    is called with the batch size of every backbone step (for metrics).
    """

    def __init__(
        self, lm: LanguageModel, max_batch: int = DEFAULT_MAX_BATCH, on_step: Callable[[int], None] | None = None
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.lm, self.max_batch, self.on_step = lm, max_batch, on_step
        self.is_calm = lm.kind == "calm"
        backbone = lm.model.backbone
        c = backbone.config
        self.cache = RowKVCache(c.num_layers, c.kv_heads, c.head_dim, lm.device, backbone.norm.weight.dtype)
        self.rows: list[_Row] = []
        self._pending: deque[_Row] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the outside

    def submit(self, seq: Sequence) -> Future:
        """Queue ``seq``; the future gets its :class:`SequenceResult`, or the exception that ended it.

        Raises :class:`~calm.generate.lm.LanguageModelError` at once for a sequence the model cannot
        serve (``LanguageModel.check_request``: temperature, N, sampler, room in the context).
        """
        self.lm.check_request(
            len(seq.prompt_ids), seq.max_new_tokens, temperature=seq.temperature, num_samples=seq.num_samples,
            sampler=seq.sampler,
        )  # fmt: skip
        row = _Row(seq, Future(), self.lm.new_generator(seq.seed), None)
        if self.is_calm:
            row.stats = SamplingStats(seq.temperature, seq.sampler)
        with self._wake:
            if self._closing:
                raise RuntimeError("the batcher is closed")
            self._pending.append(row)
            self._wake.notify()
        return row.future

    def run(self, sequences: list[Sequence]) -> list[SequenceResult]:
        """Decode ``sequences`` together on this thread and return their results in order."""
        futures = [self.submit(s) for s in sequences]
        while self.rows or self._pending:
            self.step()
        return [f.result() for f in futures]

    def start(self) -> None:
        """Serve submissions on a worker thread until :meth:`close`."""
        self._thread = threading.Thread(target=self._serve, name="calm-batcher", daemon=True)
        self._thread.start()

    def close(self, cancel: bool = False) -> None:
        """Stop taking sequences, finish (or with ``cancel``, halt at their next step) those in, and stop."""
        with self._wake:
            self._closing = True
            if cancel:
                for row in [*self.rows, *self._pending]:
                    row.halted = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self.rows or self._pending or self._closing):
                    self._wake.wait()
                if self._closing and not (self.rows or self._pending):
                    return
            self.step()

    # ------------------------------------------------------------------ one iteration

    def step(self) -> None:
        """Admit, sample every row, retire the ended rows, step the backbone once (module docstring)."""
        self._admit()
        if not self.rows:
            return
        try:
            pieces, effective = self._sample()
        except Exception as e:  # a failure of the model fails every row it was running
            self._fail_all(e)
            return
        for i, row in enumerate(self.rows):
            self._take(row, pieces[i], effective[i])
        self._retire()
        if not self.rows:
            return
        try:
            self._advance()
        except Exception as e:
            self._fail_all(e)

    def _admit(self) -> None:
        """Move waiting sequences into free rows, their prompts prefilled together (:meth:`_prefill`)."""
        joining: list[_Row] = []
        with self._wake:
            while self._pending and len(self.rows) + len(joining) < self.max_batch:
                row = self._pending.popleft()
                if row.halted or (row.seq.cancelled is not None and row.seq.cancelled.is_set()):
                    row.halted = True
                    row.future.set_result(row.result())
                elif row.future.set_running_or_notify_cancel():
                    joining.append(row)
        if not joining:
            return
        try:
            cache, lengths, news = self._prefill(joining)
            for g, row in enumerate(joining):  # the cache's rows and self.rows stay aligned, one by one
                self.cache.add(cache, max_len=lengths[g] + news[g], source=g, length=lengths[g])
                self.rows.append(row)
        except Exception as e:
            for row in joining:
                if row not in self.rows:
                    row.future.set_exception(e)

    def _prefill(self, joining: list[_Row]) -> tuple[KVCache, list[int], list[int]]:
        """Prefill the prompts of ``joining`` in one forward pass: their cache, prompt steps and new steps.

        The prompts are right-padded to the longest (CALM: each first left-padded with BOS to whole chunks,
        as alone); with causal attention a prompt's own positions never see the padding after them, so each
        row computes what it computes alone, and only its own steps join the batch's cache (:meth:`_admit`).
        """
        model, device, now = self.lm.model, self.lm.device, time.perf_counter()
        if self.is_calm:
            K, bos = model.chunk_size, self.lm.tokenizer.bos_id
            prompts = [left_pad_to_chunks([r.seq.prompt_ids], K, bos)[0].view(-1, K) for r in joining]
            news = [math.ceil(r.seq.max_new_tokens / K) for r in joining]
        else:
            prompts = [torch.tensor(r.seq.prompt_ids)[:, None] for r in joining]
            news = [r.seq.max_new_tokens for r in joining]
        lengths = [p.shape[0] for p in prompts]
        x = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=0).to(device)  # (G, L, K|1)
        last = torch.tensor(lengths, device=device) - 1
        cache = model.new_cache(len(joining), max_len=x.shape[1])
        with torch.no_grad():
            if self.is_calm:
                states = model.hidden_states(x, cache)[torch.arange(len(joining), device=device), last]
            else:
                states = model.last_logits(x[..., 0], cache, last)
        for g, row in enumerate(joining):
            row.state, row.started = states[g : g + 1], now
        return cache, lengths, news

    def _sample(self) -> tuple[list[list[int]], list[float | None]]:
        """Each row's next chunk (CALM) or token (GPT), and the temperature it was effectively sampled at."""
        pieces: list[list[int]] = [[] for _ in self.rows]
        effective: list[float | None] = [None] * len(self.rows)
        with torch.no_grad():
            if not self.is_calm:  # softmax per temperature, then each row's draw from its own generator
                by_temperature: dict[float, list[int]] = {}
                for i, row in enumerate(self.rows):
                    by_temperature.setdefault(row.seq.temperature, []).append(i)
                for t, index in by_temperature.items():
                    logits = torch.cat([self.rows[i].state for i in index])
                    chosen = sample_tokens(logits, t, [self.rows[i].generator for i in index]).tolist()
                    for i, token in zip(index, chosen, strict=True):
                        pieces[i] = [token]
                return pieces, effective
            groups: dict[tuple, list[int]] = {}
            for i, row in enumerate(self.rows):
                s = row.seq
                key = (1.0,) if s.temperature == 1.0 else (s.temperature, s.sampler, s.num_samples)
                groups.setdefault(key, []).append(i)
            for index in groups.values():
                s = self.rows[index[0]].seq
                h = torch.cat([self.rows[i].state for i in index])
                chunks, temps = sample_step(
                    self.lm.model, h, temperature=s.temperature, num_samples=s.num_samples, sampler=s.sampler,
                    generator=[self.rows[i].generator for i in index],
                )  # fmt: skip
                for j, i in enumerate(index):
                    pieces[i], effective[i] = chunks[j].tolist(), temps[j]
        return pieces, effective

    def _take(self, row: _Row, piece: list[int], effective: float | None) -> None:
        """Keep a row's new tokens up to its stop token and its room, as ``generate_rows`` does alone."""
        seq = row.seq
        row.sampled = piece
        if row.stats is not None:
            row.stats.record(effective)
        piece, row.stopped = keep_chunk(row.out, piece, seq.max_new_tokens, seq.stop_ids)
        row.done = row.stopped or len(row.out) >= seq.max_new_tokens
        try:
            if piece and seq.on_tokens is not None and seq.on_tokens(piece) is False:
                row.done = row.halted = True
        except Exception as e:
            row.done = True
            row.future.set_exception(e)
        if seq.cancelled is not None and seq.cancelled.is_set():
            row.done = row.halted = True

    def _retire(self) -> None:
        for i in reversed(range(len(self.rows))):
            row = self.rows[i]
            if not (row.done or row.halted):
                continue
            if not row.future.done():
                row.future.set_result(row.result())
            self.cache.remove(i)
            self.rows[i] = self.rows[-1]
            self.rows.pop()

    def _advance(self) -> None:
        """One backbone step for every row, fed the chunk (or token) it just sampled; rows keep their new state."""
        model = self.lm.model
        x = torch.tensor([row.sampled for row in self.rows], device=self.lm.device)  # (B, K) or (B, 1)
        with torch.no_grad():
            states = model.hidden_states(x[:, None], self.cache) if self.is_calm else model(x, self.cache)
        for i, row in enumerate(self.rows):
            row.state = states[i : i + 1, -1]
        if self.on_step is not None:
            self.on_step(len(self.rows))

    def _fail_all(self, error: Exception) -> None:
        for i in reversed(range(len(self.rows))):
            if not self.rows[i].future.done():
                self.rows[i].future.set_exception(error)
            self.cache.remove(i)
        self.rows.clear()
