"""The OpenAI completions API as ``calm serve`` reads it: request bodies, their checks, and the errors it answers.

``CompletionRequest`` and ``ChatRequest`` (pydantic, strict types, unknown fields refused) are the bodies
of ``POST /v1/completions`` and ``POST /v1/chat/completions``; :func:`validate_request` turns one into a
:class:`Job` (one (prompt, seed) per choice) or raises :class:`APIError`, answered as OpenAI's
``{"error": {"message", "type", "param", "code"}}``. The model's own rules (CALM's temperatures in (0, 1],
the room in the context) are those of ``calm.generate.lm``, with its messages. What runs a job is
``calm/interop/serve.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from calm.generate.batching import DEFAULT_MAX_BATCH
from calm.generate.completion import CompletionResult, TextCompleter
from calm.generate.lm import LanguageModelError
from calm.generate.sampling import SamplingStats


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (OpenAI's shape) and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status, headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _RequestFields(BaseModel):
    """The fields ``/v1/completions`` and ``/v1/chat/completions`` share; strict types, unknown fields refused."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float | None = 1.0
    n: int | None = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    # CALM's likelihood-free temperature (paper §6): extra body fields.
    num_samples: int | None = Field(default=None, ge=1)
    sampler: Literal["batch", "exact"] | None = None
    # OpenAI fields accepted only at their neutral value.
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None


class CompletionRequest(_RequestFields):
    """The body of ``POST /v1/completions``."""

    prompt: str | list[str]
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first OpenAI option set to something this server cannot do."""
        neutral = {
            "top_p": (None, 1, 1.0),
            "logprobs": (None,),
            "echo": (None, False),
            "presence_penalty": (None, 0, 0.0),
            "frequency_penalty": (None, 0, 0.0),
            "logit_bias": (None, {}),
            "suffix": (None, ""),
        }
        for name, allowed in neutral.items():
            if getattr(self, name) not in allowed:
                return name, f"{name}={getattr(self, name)!r} is not supported by this server; leave it unset"
        if self.best_of not in (None, self.n):
            return "best_of", "best_of is not supported (no likelihoods to rank choices by); leave it unset"
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: str
    content: str


class ChatRequest(_RequestFields):
    """The body of ``POST /v1/chat/completions``: the completion fields, ``messages`` in place of ``prompt``."""

    messages: list[ChatMessage]

    def as_completion(self, prompt: str) -> CompletionRequest:
        fields = self.model_dump(exclude={"messages", "stream"})
        return CompletionRequest(**{**fields, "prompt": prompt})


@dataclass
class ServeSettings:
    """What ``calm serve`` was started with."""

    model_name: str
    api_key: str | None = None
    max_choices: int = 16  # len(prompt) * n per request
    default_num_samples: int = 200
    default_sampler: str = "batch"
    max_queue: int = 64
    """Requests waiting or running at once; one more gets 503 with Retry-After."""
    request_timeout: float | None = 600.0
    """Seconds a request may take from admission (504, or an error event when streaming); None: no limit."""
    max_batch: int = DEFAULT_MAX_BATCH
    """Sequences (choices) decoded together at most; more wait for a free row of the batch."""


@dataclass
class Job:
    """One validated completion request, expanded to (prompt, seed) per choice."""

    prompts: list[str]
    n: int
    max_tokens: int
    temperature: float
    stop: list[str]
    seed: int | None
    num_samples: int
    sampler: str
    raw_prompt: bool = False
    """A rendered chat: not wrapped again in the checkpoint's prompt template."""

    def choices(self) -> Iterator[tuple[int, str, int | None]]:
        for j, prompt in enumerate(self.prompts):
            for i in range(self.n):
                index = j * self.n + i
                yield index, prompt, None if self.seed is None else self.seed + index


def validate_request(
    req: CompletionRequest, completer: TextCompleter, settings: ServeSettings, raw_prompt: bool = False
) -> Job:
    """Turn a parsed request into a job, or raise :class:`APIError` (400/404) naming the problem."""
    if req.model != settings.model_name:
        raise APIError(
            404, f"model {req.model!r} is not served here; this server serves {settings.model_name!r}", "model",
            "model_not_found",
        )  # fmt: skip
    problem = req.unsupported()
    if problem:
        raise APIError(400, problem[1], problem[0])
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise APIError(400, "prompt is an empty list; send a string or a non-empty list of strings", "prompt")
    n = req.n or 1
    if len(prompts) * n > settings.max_choices:
        raise APIError(
            400,
            f"{len(prompts)} prompt(s) x n={n} asks for {len(prompts) * n} completions; this server allows at most "
            f"{settings.max_choices} per request (calm serve --max-choices)",
            "n",
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    job = Job(
        prompts=prompts,
        n=n,
        max_tokens=16 if req.max_tokens is None else req.max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        stop=stop,
        seed=req.seed,
        num_samples=req.num_samples or settings.default_num_samples,
        sampler=req.sampler or settings.default_sampler,
        raw_prompt=raw_prompt,
    )
    lm = completer.lm
    for prompt in prompts:
        try:
            lm.check_request(
                len(lm.encode_prompt(prompt, raw_prompt)),
                job.max_tokens,
                temperature=job.temperature,
                num_samples=job.num_samples,
                sampler=job.sampler,
            )
        except LanguageModelError as e:
            raise APIError(400, str(e), _REQUEST_FIELDS.get(e.param, e.param)) from e
    return job


_REQUEST_FIELDS = {"max_new_tokens": "max_tokens"}
"""The request field of a ``LanguageModelError.param`` where the OpenAI name differs from ours."""


def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def usage_counts(completions: list[CompletionResult], job: Job) -> dict[str, Any]:
    prompt_tokens = sum(c.prompt_tokens for c in completions[:: job.n])  # each prompt counted once
    completion_tokens = sum(c.completion_tokens for c in completions)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    sampling = [c.sampling for c in completions if c.sampling is not None]
    if sampling:  # CALM: how often the likelihood-free sampler met the temperature asked
        usage["sampling"] = SamplingStats.combine(sampling).to_dict()
    return usage
