"""What a deployment of ``calm serve`` needs around the completions: metrics, a bounded queue, timeouts.

- :class:`ServerMetrics`: Prometheus metrics in a registry of the server's own (``GET /metrics``, the
  text format, through ``prometheus_client``): requests by endpoint and status, prompt and completion
  tokens, sequences waiting for a row of the batch and in it, and histograms of the batch size of each
  backbone step, of the time to first token and of the time per output token.
- :class:`Admission`: at most ``max_queue`` requests waiting or running; one more is answered 503 with
  ``Retry-After`` and never reaches the worker, so the server keeps answering the requests it admitted.
  It counts the requests finished, cancelled (timeout, client gone) and rejected, for the shutdown log.

Both are ours (the paper has no server); ``calm/interop/serve.py`` wires them into the app.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of ``GET /metrics`` (Prometheus text format)."""

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The server's Prometheus metrics (module docstring); :meth:`render` gives the exposition text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "calm_requests", "Requests answered, by endpoint and HTTP status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "calm_prompt_tokens", "Prompt tokens of completed requests (BOS included)", registry=r
        )
        self.completion_tokens = Counter("calm_completion_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge(
            "calm_queue_length", "Sequences (choices) admitted and waiting for a row of the batch", registry=r
        )
        self.batch_size = Gauge("calm_batch_size", "Sequences (choices) in the batch now", registry=r)
        self.step_batch_size = Histogram(
            "calm_step_batch_size", "Sequences in each batched backbone step", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "calm_time_to_first_token_seconds", "From admission to the first text of a choice", registry=r,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.time_per_output_token = Histogram(
            "calm_time_per_output_token_seconds", "Generation time of a choice divided by its tokens", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )  # fmt: skip

    def watch(self, batcher: Any) -> None:
        """Read the queue length and the batch size from ``batcher`` (``waiting``, ``active``) when scraped."""
        self.queue_length.set_function(lambda: batcher.waiting)
        self.batch_size.set_function(lambda: batcher.active)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class QueueFull(Exception):
    """Raised by :meth:`Admission.admit` when ``max_queue`` requests are already in."""


class Place:
    """One admitted request's place in the queue; released once, however often :meth:`release` is called."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release()
            self._admission = None

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """At most ``max_queue`` requests waiting or running (module docstring). Thread-safe."""

    def __init__(self, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.waiting = self.running = 0
        self.finished = self.cancelled = self.rejected = 0

    def admit(self) -> Place:
        """A place for one request, held until :meth:`Place.release` (or the end of a ``with`` block); raises
        :class:`QueueFull` when none is free."""
        with self._lock:
            if self.waiting + self.running >= self.max_queue:
                self.rejected += 1
                raise QueueFull
            self.waiting += 1
        return Place(self)

    def _release(self) -> None:
        with self._lock:
            self.waiting -= 1

    @contextlib.contextmanager
    def running_one(self) -> Iterator[None]:
        """Mark an admitted request as running: its choices are in the batcher (it stays admitted)."""
        with self._lock:
            self.running += 1
            self.waiting -= 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
                self.waiting += 1  # balanced by admit()'s exit

    def count(self, cancelled: bool) -> None:
        with self._lock:
            if cancelled:
                self.cancelled += 1
            else:
                self.finished += 1

    def summary(self) -> str:
        return (
            f"{self.finished} requests finished, {self.cancelled} cancelled (timeout or client gone), "
            f"{self.rejected} rejected (queue full), {self.waiting + self.running} still in"
        )
