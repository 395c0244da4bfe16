"""An OpenAI-compatible completions server for CALM and GPT checkpoints (``calm serve``).

Speaks the part of the OpenAI API that text-completion clients use (the official ``openai``
client, ``curl``, lm-evaluation-harness's ``local-completions``):

- ``GET /v1/models`` lists the one served model;
- ``POST /v1/chat/completions`` (not streamed) renders ``messages`` with the checkpoint's chat template
  (``calm finetune`` stores it; ``calm.data.instruct.DEFAULT_CHAT_TEMPLATE`` otherwise) and completes
  the result as ``/v1/completions`` would, with the same fields;
- ``POST /v1/completions`` with ``prompt`` (a string or a list of strings), ``max_tokens``,
  ``temperature``, ``n``, ``stop``, ``seed``, ``stream`` (server-sent events, one event per decoded
  chunk of K tokens for CALM, per token for the GPT), ``stream_options.include_usage``, and the CALM
  options ``num_samples`` (N candidates of the batch approximation, paper Alg. 2) and ``sampler``
  (``batch`` | ``exact``, Alg. 1) as extra body fields. Responses carry ``usage`` counts; for CALM,
  ``usage.sampling`` adds how many generated chunks fell back from the temperature asked (Alg. 2
  samples a step at T = 1 when all N candidates differ) and the mean temperature effectively
  sampled (``calm.generate.sampling.SamplingStats``).

Every choice of every request in flight is a row of one continuous batch (``calm.generate.batching``,
up to ``max_batch`` rows): rows join and leave between backbone steps, and each draws its random
numbers from its own generator, so the text of a choice does not depend on what else is running.
Choice ``i`` of a request with ``seed`` s is generated with seed s + i, so ``generate_text(model,
tok, [prompt], max_tokens, ..., seed=s + i)`` reproduces it (the choices of prompt j follow those of
prompt j - 1 in the numbering).

Bad requests (wrong types, unknown fields, a temperature the model cannot sample at, a prompt longer
than the context, ``n`` too large, a wrong API key; ``calm/interop/serve_api.py``) get an OpenAI-style JSON error
(``{"error": {"message", "type", "param", "code"}}``) with status 400 (401 for the key, 404 for
an unknown model) and the server keeps serving. The model's own rules (CALM samples at T in (0, 1],
the GPT at T in [0, 2] with T = 0 greedy) are those of ``calm.generate.lm``, with the same messages
as ``generate_text`` and ``calm generate``. It binds to 127.0.0.1 unless told otherwise.

Built on FastAPI and uvicorn (the ``serve`` extra: ``pip install 'calm-lm[serve]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from calm.generate.batching import DEFAULT_MAX_BATCH, Batcher
from calm.generate.completion import CompletionResult, TextCompleter, TextSink
from calm.generate.lm import LanguageModelError, load_language_model
from calm.interop.serve_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Job,
    ServeSettings,
    choice,
    error_response,
    usage_counts,
    validate_request,
)
from calm.interop.serve_ops import METRICS_CONTENT_TYPE, Admission, Place, QueueFull, ServerMetrics
from calm.io import to_json

API_KEY_ENV = "CALM_API_KEY"
RETRY_AFTER_S = 1
"""The ``Retry-After`` of a 503 from a full queue, in seconds."""


class CompletionService:
    """Runs validated jobs through one :class:`~calm.generate.batching.Batcher` (continuous batching: every
    choice of every request in flight is a row of one batch), behind a bounded queue
    (:class:`~calm.interop.serve_ops.Admission`), with a per-request timeout and the server's metrics."""

    def __init__(self, completer: TextCompleter, settings: ServeSettings) -> None:
        self.completer = completer
        self.settings = settings
        self.metrics = ServerMetrics()
        self.admission = Admission(settings.max_queue)
        self.batcher = Batcher(completer.lm, settings.max_batch, on_step=self.metrics.step_batch_size.observe)
        self.metrics.watch(self.batcher)
        self.batcher.start()

    def admit(self) -> Place:
        """A place in the queue, or a 503 with ``Retry-After`` when it is full."""
        try:
            return self.admission.admit()
        except QueueFull:
            raise APIError(
                503, f"the server is busy ({self.settings.max_queue} requests queued or running; calm serve "
                "--max-queue); retry later", None, "queue_full", headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None  # fmt: skip

    def _submit(self, job: Job, cancelled: threading.Event, admitted: float, put: Any = None) -> list[asyncio.Future]:
        """Every choice of ``job`` into the batch; a future of each one's :class:`CompletionResult`.

        ``put(kind, value)`` (streaming) gets ``("text", (index, text))`` as text is decoded and ``("finish",
        (index, reason))`` or ``("error", message)`` when a choice ends, in order.
        """
        loop = asyncio.get_running_loop()
        results = []
        for index, prompt, seed in job.choices():
            first: list[float] = []

            def on_text(text: str, index: int = index, first: list[float] = first) -> None:
                if not first:
                    first.append(time.perf_counter())
                    self.metrics.time_to_first_token.observe(first[0] - admitted)
                if put is not None:
                    put("text", (index, text))

            seq, sink = self.completer.prepare(
                prompt, job.max_tokens, temperature=job.temperature, stop=job.stop, seed=seed,
                num_samples=job.num_samples, sampler=job.sampler, emit=on_text, cancelled=cancelled,
                raw_prompt=job.raw_prompt,
            )  # fmt: skip
            result: asyncio.Future = loop.create_future()
            results.append(result)
            self.batcher.submit(seq).add_done_callback(
                lambda done, sink=sink, index=index, result=result: self._finish(done, sink, index, result, put)
            )
        return results

    def _finish(self, done: Any, sink: TextSink, index: int, result: asyncio.Future, put: Any) -> None:
        """On the batcher's thread, as a choice ends: its result to the request's event loop."""
        loop = result.get_loop()
        try:
            sequence = done.result()
            completion = sink.result(sequence)
        except Exception as e:
            loop.call_soon_threadsafe(_set_exception, result, e)
            if put is not None:
                put("error", f"{type(e).__name__}: {e}")
            return
        if completion.completion_tokens:
            self.metrics.time_per_output_token.observe(
                (time.perf_counter() - sequence.started) / completion.completion_tokens
            )
        loop.call_soon_threadsafe(_set_result, result, completion)
        if put is not None:
            put("finish", (index, completion.finish_reason))

    def _usage(self, results: list[CompletionResult], job: Job) -> dict[str, Any]:
        usage = usage_counts(results, job)
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        self.metrics.completion_tokens.inc(usage["completion_tokens"])
        return usage

    def _timeout_message(self) -> str:
        return f"the request took longer than {self.settings.request_timeout:g} s (calm serve --request-timeout)"

    async def complete(self, job: Job, meta: dict[str, Any], request: Request | None = None) -> dict[str, Any]:
        """The whole response of a non-streaming request (504 after the timeout; nothing if the client left)."""
        cancelled, admitted, timeout = threading.Event(), time.perf_counter(), self.settings.request_timeout
        gone = None if request is None else asyncio.ensure_future(_client_gone(request))
        try:
            with self.admission.running_one():
                everything = asyncio.gather(*self._submit(job, cancelled, admitted))
                waiting = {everything} if gone is None else {everything, gone}
                await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not everything.done():  # the client left, or the time ran out
                    cancelled.set()  # the batch drops its rows before the next step
                    await asyncio.gather(everything, return_exceptions=True)
                    self.admission.count(cancelled=True)
                    if gone is not None and gone.done():
                        return {}
                    raise APIError(504, self._timeout_message(), None, "timeout")
                results = everything.result()
        finally:
            if gone is not None:
                gone.cancel()
        self.admission.count(cancelled=False)
        choices = [choice(i, c.text, c.finish_reason) for i, c in enumerate(results)]
        return {"object": "text_completion", **meta, "choices": choices, "usage": self._usage(results, job)}

    async def stream(
        self, job: Job, meta: dict[str, Any], include_usage: bool, flight: _InFlight
    ) -> AsyncIterator[str]:
        """Server-sent events: text as it is decoded, a finish event per choice, usage, ``[DONE]``.

        Ends ``flight`` when done; :meth:`watch` ends it first when the client leaves.
        """
        loop, queue = asyncio.get_running_loop(), flight.events
        admitted, timeout = time.perf_counter(), self.settings.request_timeout

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {to_json({'object': 'text_completion', **meta, 'choices': choices, **extra})}\n\n"

        complete = False
        try:
            results = self._submit(job, flight.cancelled, admitted, put)
            remaining = len(results)
            while remaining and not flight.ended:
                try:  # ending the flight (the client left) puts an event that wakes this loop
                    left = None if timeout is None else max(0.0, timeout - (time.perf_counter() - admitted))
                    kind, value = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    kind, value = "error", self._timeout_message()
                if kind == "text":
                    yield chunk([choice(value[0], value[1], None)])
                elif kind == "finish":
                    yield chunk([choice(value[0], "", value[1])])
                    remaining -= 1
                elif kind == "error":  # reported in the stream: the status line has already gone out
                    error = {"message": value, "type": "server_error", "param": None, "code": None}
                    yield f"data: {to_json({'error': error})}\n\n"
                    break
            if not remaining:
                complete = True
                usage = self._usage([r.result() for r in results], job)
                if include_usage:
                    yield chunk([], usage=usage)
            yield "data: [DONE]\n\n"
        finally:
            flight.end(complete)

    async def watch(self, request: Request, flight: _InFlight) -> None:
        """End ``flight`` as cancelled once its client has gone, whatever the stream is doing: uvicorn drops
        writes to a closed connection without an error, and a response that Starlette stops while it is
        sending never resumes the stream to let it clean up. Cancelled by the flight's end."""
        await _client_gone(request)
        flight.end(complete=False)


async def _client_gone(request: Request) -> None:
    """Return once the client has disconnected: with the body read, the next ASGI message is the disconnect
    (uvicorn also sends it once the response is complete). Waits without polling."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _InFlight:
    """A streamed request's bookkeeping, ended once by whichever notices first: the stream finishing or failing,
    or :meth:`CompletionService.watch` seeing the client leave. Ending it drops the request's rows from the
    batch (``cancelled``), counts it and frees its place in the queue. Used on the event loop's thread only."""

    def __init__(self, admission: Admission, place: Place) -> None:
        self.cancelled = threading.Event()
        self.ended = False
        self.watcher: asyncio.Task | None = None
        """The task of :meth:`CompletionService.watch`, cancelled when the flight ends."""
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        """The stream's events (text, finish, error; ``ended`` when the flight ends), in order."""
        self._admission, self._place = admission, place
        self._running = contextlib.ExitStack()
        self._running.enter_context(admission.running_one())

    def end(self, complete: bool) -> None:
        if self.ended:
            return
        self.ended = True
        self.cancelled.set()  # rows still in the batch leave before the next step
        self.events.put_nowait(("ended", None))  # wakes the stream, which then stops
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()
        self._running.close()
        self._admission.count(cancelled=not complete)
        self._place.release()


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


class _CountRequests:
    """Counts every answered request by path and status (``calm_requests_total``): a plain ASGI middleware, which,
    unlike Starlette's ``BaseHTTPMiddleware``, leaves ``receive`` to the app (the disconnect watch needs it)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def noting_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            self.metrics.requests.labels(scope["path"], str(status[0])).inc()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}"
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {'.'.join(where)!r}; see GET /docs for the accepted fields"
        return error_response(400, message, where[0] if where else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))


def create_app(completer: TextCompleter, settings: ServeSettings) -> FastAPI:
    """The ASGI app: routes, API-key check, OpenAI-style errors, and the worker that runs completions."""
    service = CompletionService(completer, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield  # uvicorn stops accepting on SIGTERM and lets the open requests finish first
        service.batcher.close(cancel=True)
        print(f"calm serve stopped: {service.admission.summary()}", file=sys.stderr, flush=True)

    def check_key(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key")

    app = FastAPI(title="calm", lifespan=lifespan, dependencies=[Depends(check_key)])
    app.state.service = service  # for tests and embedding: the queue's counts, the metrics
    watchers: set[asyncio.Task] = set()
    _install_error_handlers(app)

    app.add_middleware(_CountRequests, metrics=service.metrics)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "queue": service.admission.waiting,
                "running": service.admission.running}  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "calm"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        job = validate_request(req, completer, settings)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        place = service.admit()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            flight = _InFlight(service.admission, place)
            flight.watcher = asyncio.create_task(service.watch(request, flight))
            watchers.add(flight.watcher)  # held until it ends (the loop keeps only weak references)
            flight.watcher.add_done_callback(watchers.discard)
            events = service.stream(job, meta, include_usage, flight)
            return StreamingResponse(events, media_type="text/event-stream")
        with place:
            return await service.complete(job, meta, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        if req.stream:
            raise APIError(
                400, "stream=true is not supported on /v1/chat/completions yet; use /v1/completions", "stream"
            )
        if not req.messages:
            raise APIError(400, "messages is empty; send at least one {role, content} message", "messages")
        try:
            prompt = completer.lm.render_chat([m.model_dump() for m in req.messages])
        except LanguageModelError as e:
            raise APIError(400, str(e), "messages") from e
        job = validate_request(req.as_completion(prompt), completer, settings, raw_prompt=True)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        with service.admit():
            response = await service.complete(job, meta, request)
        if not response:  # the client left
            return response
        choices = [
            {
                "index": c["index"],
                "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"],
            }
            for c in response["choices"]
        ]
        return {**response, "object": "chat.completion", "choices": choices}

    return app


def load_app(
    checkpoint: str,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_choices: int = 16,
    device: str = "cpu",
    dtype: str | None = None,
    max_queue: int = 64,
    request_timeout: float | None = 600.0,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> FastAPI:
    """Load a checkpoint (or run directory) and build its app; ``model_name`` defaults to the folder name;
    ``dtype`` (fp32 | bf16) casts the weights as they are read."""
    completer = TextCompleter(load_language_model(checkpoint, device, dtype=dtype))
    given = Path(checkpoint).resolve()
    # runs/NAME or runs/NAME/checkpoints/step_N -> NAME
    name = model_name or (given.parent.parent.name if given.parent.name == "checkpoints" else given.name)
    settings = ServeSettings(
        model_name=name, api_key=api_key, max_choices=max_choices, max_queue=max_queue,
        request_timeout=request_timeout, max_batch=max_batch,
    )  # fmt: skip
    return create_app(completer, settings)


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread; yields its base URL (``http://HOST:PORT``), stops on exit.

    ``port=0`` takes a free port: the socket is bound here and handed to uvicorn, so no other
    process can take the port in between. For tests and benchmarks.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start; see the log above")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def serve(
    checkpoint: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    api_key: str | None = None,
    max_choices: int = 16,
    dtype: str | None = None,
    max_queue: int = 64,
    request_timeout: float | None = 600.0,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> None:
    """Serve a checkpoint until interrupted (the ``calm serve`` command); SIGTERM lets open requests finish."""
    app = load_app(
        checkpoint, model_name=model_name, api_key=api_key, max_choices=max_choices, dtype=dtype,
        max_queue=max_queue, request_timeout=request_timeout, max_batch=max_batch,
    )  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="info")
