"""The language-model interface: what generation, serving and evaluation ask of a CALM or a token LM.

A loaded checkpoint is either CALM (paper §4: K tokens per backbone step, a generative head with no
likelihood) or the token-level Transformer baseline (§7.1). :func:`as_language_model` decides which,
in this one place, and returns a :class:`LanguageModel`; ``generate_text`` / ``complete``, ``calm
generate``, ``calm serve``, the lm-evaluation-harness model, ``calm eval`` and prompt following all
ask that object instead of checking the model's class. Each rule is written once, here:

- **Temperature.** CALM accepts T in (0, 1]: likelihood-free sampling (paper §6) draws from
  P(x)^(1/T) with 1/T >= 1, so it can only sharpen the model; T = 1 is plain sampling, T < 1 uses the
  batch approximation (Alg. 2, ``sampler="batch"`` with N = ``num_samples`` candidates) or the exact
  rejection sampler (Alg. 1, ``"exact"``). The token LM accepts T in [0, 2] (OpenAI's range): softmax
  of logits / T, and T = 0 decodes greedily.
- **Greedy decoding** (``greedy_temperature``): the token LM's argmax (T = 0). CALM has no argmax;
  callers that must decode greedily (lm-eval's ``do_sample=False``) use a small temperature instead,
  0.01 by default: the T -> 0 limit of Alg. 2, the most frequent of N candidate chunks.
- **Requests.** ``num_samples`` >= 1, ``sampler`` in ``batch`` | ``exact`` (used by CALM only),
  ``max_new_tokens`` >= 1 and within the room the context leaves (:meth:`LanguageModel.max_new_tokens`).
- **Prompts and document ends.** A prompt is ``[BOS] + tokens`` (CALM left-pads it with BOS to a
  multiple of K; why: ``calm.generate.engine``). Training data is packed with a BOS before every
  document, so a model ends a document by emitting BOS (or EOS): text generation stops there unless
  told not to, and special tokens never appear in the text.
- **BrierLM** (paper §5): the token LM exposes incremental logits (:meth:`TokenLanguageModel.step_logits`)
  for the token estimator, CALM its model for the chunk estimator; ``calm.eval.brier.score_block``
  scores a block of either.

A request a model cannot serve raises :class:`LanguageModelError` (a ValueError) with one message per
rule that names the fix; the CLI prints it as one ``error:`` line (exit status 2), the server answers
400 with it, and the lm-eval model raises it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from calm.checkpoint import load_model
from calm.data.instruct import (
    DEFAULT_CHAT_TEMPLATE,
    DEFAULT_PROMPT_TEMPLATE,
    ExampleError,
    compile_template,
    render,
)
from calm.generate.engine import generate_rows, left_pad_to_chunks
from calm.generate.sampling import SamplingStats
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM
from calm.models.gpt import GPT
from calm.models.heads import with_sampling_steps

SAMPLERS = ("batch", "exact")
"""CALM's temperature samplers: the batch approximation (paper Alg. 2) and exact rejection (Alg. 1)."""

CALM_GREEDY_TEMPERATURE = 0.01
"""What CALM samples at when a caller asks for greedy decoding (it has no argmax)."""

TOKEN_LM_MAX_TEMPERATURE = 2.0
"""Largest temperature of the token LM (OpenAI's range is [0, 2])."""


WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The weight precisions a model can be loaded in (``--dtype`` of ``calm generate`` and ``calm serve``)."""


class LanguageModelError(ValueError):
    """A request a language model cannot serve as asked; the message names the rule and the fix.

    ``param`` names the argument at fault (``temperature``, ``num_samples``, ``sampler``,
    ``max_new_tokens``, ``prompt``, ``head_steps`` or ``model``), for the server's error field.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Completion:
    """One prompt's continuation, as :meth:`LanguageModel.complete` returns it."""

    text: str
    """The new text: special tokens never appear in it."""
    token_ids: list[int]
    """The new token ids, the stop token (BOS/EOS) excluded."""
    finish_reason: str
    """``"stop"``: the model ended the document (BOS or EOS); ``"length"``: ``max_new_tokens`` ran out."""
    sampling: SamplingStats | None = None
    """CALM: how many steps fell back from the temperature asked, and the temperature effectively
    sampled (:class:`~calm.generate.sampling.SamplingStats`); None for a token model, whose softmax
    temperature is exact."""


OnTokens = Callable[[int, list[int]], None]
"""``on_tokens(row, tokens)``: called with each row's new tokens as they are decoded (for streaming)."""


class LanguageModel:
    """A CALM or token LM with its tokenizer, as every caller sees it (see the module docstring).

    Build one with :func:`as_language_model` or :func:`load_language_model`. ``model`` and
    ``tokenizer`` are the wrapped ``nn.Module`` (in eval mode) and ``calm.data.tokenizer.Tokenizer``.
    """

    kind: ClassVar[str]
    """``"calm"`` or ``"gpt"`` (``"hf"`` for a Hugging Face model scored by ``calm eval --hf-model``)."""
    has_likelihood: ClassVar[bool]
    """Whether the model gives next-token probabilities (log-likelihood tasks, perplexity)."""
    greedy_temperature: float
    """The temperature that stands for greedy decoding (see the module docstring)."""

    prompt_template: Any = None
    """A fine-tuned checkpoint's prompt template (``calm.data.instruct``, compiled), applied to every prompt
    by :meth:`encode_prompt`; None: prompts are used as given."""
    chat_template: Any = compile_template(DEFAULT_CHAT_TEMPLATE, "chat template")
    """The compiled Jinja template that renders chat messages into a prompt (:meth:`render_chat`): a
    fine-tuned checkpoint's own, else ``calm.data.instruct.DEFAULT_CHAT_TEMPLATE``."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ shape of the model

    @property
    def tokens_per_step(self) -> int:
        """Tokens per backbone step: K for CALM, 1 for a token LM."""
        raise NotImplementedError

    @property
    def context_steps(self) -> int:
        """Backbone steps the model attends over (its ``max_seq_len``)."""
        return self.model.config.max_seq_len

    @property
    def context_tokens(self) -> int:
        """The context in tokens: ``context_steps`` x ``tokens_per_step``."""
        return self.context_steps * self.tokens_per_step

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe_context(self) -> str:
        """The context in words, for messages (e.g. ``16 steps of 4 tokens``)."""
        raise NotImplementedError

    def max_new_tokens(self, num_prompt_ids: int) -> int:
        """Most new tokens that fit after a prompt of ``num_prompt_ids`` ids (BOS included); may be <= 0."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the rules

    def check_temperature(self, temperature: float) -> None:
        """Raise :class:`LanguageModelError` unless this kind of model samples at ``temperature``."""
        raise NotImplementedError

    def check_request(
        self,
        num_prompt_ids: int,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        num_samples: int = 1,
        sampler: str = "batch",
    ) -> None:
        """Raise :class:`LanguageModelError` if a request cannot run on this model as asked.

        ``num_prompt_ids`` counts the prompt's ids with BOS (``len(encode_prompt(text))``).
        """
        if max_new_tokens < 1:
            raise LanguageModelError(f"max_new_tokens must be >= 1, got {max_new_tokens}", "max_new_tokens")
        self.check_temperature(temperature)
        if num_samples < 1:
            raise LanguageModelError(
                f"num_samples must be >= 1, got {num_samples} (N, the candidates of the batch approximation)",
                "num_samples",
            )
        if sampler not in SAMPLERS:
            raise LanguageModelError(f"sampler must be 'batch' or 'exact', got {sampler!r}", "sampler")
        room = self.max_new_tokens(num_prompt_ids)
        if max_new_tokens > room:
            raise LanguageModelError(
                f"the prompt is {num_prompt_ids} tokens (BOS included) and {max_new_tokens} new tokens are asked "
                f"for, which exceeds the context of {self.describe_context()}: there is room for at most "
                f"{max(room, 0)} new tokens; shorten the prompt or ask for fewer tokens",
                "max_new_tokens" if room >= 1 else "prompt",
            )

    def set_head_steps(self, steps: int) -> None:
        """Set the sampling steps of a CALM flow or diffusion head (the paper's head ablation, Figs. 8-9)."""
        raise LanguageModelError(
            f"head_steps applies to CALM checkpoints with a flow or diffusion head, not {self.kind}", "head_steps"
        )

    # ------------------------------------------------------------------ text and token ids

    def encode_prompt(self, text: str, raw: bool = False) -> list[int]:
        """The ids the model is conditioned on: BOS + the text's tokens (the text wrapped by
        ``prompt_template`` first, where the checkpoint was fine-tuned with one, unless ``raw``)."""
        if self.prompt_template is not None and not raw:
            text = render(self.prompt_template, "checkpoint's prompt template", prompt=text)
        return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a conversation ({role, content} messages): ``chat_template`` rendered. Raises
        LanguageModelError when the template does not render these messages."""
        try:
            return render(self.chat_template, "chat template", messages=messages)
        except ExampleError as e:
            raise LanguageModelError(str(e), "messages") from None

    def stop_ids(self, at_document_end: bool = True) -> frozenset[int]:
        """Tokens that end a continuation: BOS and EOS (the end of a document), or none."""
        return frozenset({self.tokenizer.bos_id, self.tokenizer.eos_id}) if at_document_end else frozenset()

    def decode_text(self, ids: list[int]) -> str:
        """Text of generated ``ids`` without any special token (BOS, EOS, PAD and other special ids)."""
        tok = self.tokenizer
        specials = {tok.bos_id, tok.eos_id, tok.pad_id}
        return tok.decode([i for i in ids if i not in specials], skip_special_tokens=True)

    def new_generator(self, seed: int | None) -> torch.Generator:
        """A generator on the model's device: seeded with ``seed``, or from fresh entropy when None."""
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        return generator

    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float,
        num_samples: int,
        sampler: str,
        generator: torch.Generator,
        stop_ids: frozenset[int],
        on_tokens: OnTokens | None = None,
        stats: list[SamplingStats] | None = None,
    ) -> tuple[list[list[int]], list[bool]]:
        """Continue each prompt (ids, BOS first) by up to ``max_new_tokens`` tokens.

        Returns each row's new ids (the stop token and what follows it excluded) and whether the row
        ended at a token of ``stop_ids``. ``stats`` (CALM only: one per prompt) is filled as the rows
        are sampled. The request is not checked here; see :meth:`check_request`.
        """
        raise NotImplementedError

    def complete(
        self,
        prompts: list[str],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        num_samples: int = 200,
        sampler: str = "batch",
        seed: int | None = None,
        stream: Callable[[str], None] | None = None,
        stop_at_document_end: bool = True,
        stats: list[SamplingStats] | None = None,
        raw_prompt: bool = False,
    ) -> list[Completion]:
        """Text in, :class:`Completion` (text, token ids, finish reason, sampling stats) out; see :func:`complete`.

        ``stats``: an empty list to receive each prompt's :class:`~calm.generate.sampling.SamplingStats`
        (CALM) as generation runs, so they are there even when ``stream`` stops it by raising.
        ``raw_prompt``: the prompts are not wrapped in ``prompt_template`` (e.g. rendered chats).
        """
        ids = [self.encode_prompt(p, raw_prompt) for p in prompts]
        for row in ids:
            self.check_request(
                len(row), max_new_tokens, temperature=temperature, num_samples=num_samples, sampler=sampler
            )
        generator = self.new_generator(seed)
        row_stats = [SamplingStats(temperature, sampler) for _ in ids] if self.kind == "calm" else None
        if stats is not None and row_stats is not None:
            stats.extend(row_stats)
        text_so_far = TextStream(self)

        def on_tokens(row: int, tokens: list[int]) -> None:
            if stream is None or row != 0:
                return
            piece = text_so_far.feed(tokens)
            if piece is not None:
                stream(piece)

        out, stopped = self.generate_ids(
            ids,
            max_new_tokens,
            temperature=temperature,
            num_samples=num_samples,
            sampler=sampler,
            generator=generator,
            stop_ids=self.stop_ids(stop_at_document_end),
            on_tokens=on_tokens,
            stats=row_stats,
        )
        texts = [self.decode_text(o) for o in out]
        if stream is not None and text_so_far.rest(texts[0]):
            stream(text_so_far.rest(texts[0]))
        sampling = row_stats or [None] * len(out)
        return [
            Completion(t, o, "stop" if s else "length", r)
            for t, o, s, r in zip(texts, out, stopped, sampling, strict=True)
        ]


class TextStream:
    """The text of a growing list of generated ids, handed on in pieces (streaming): the text is decoded from
    all ids so far, and a piece is held back while the text ends inside a multi-byte character."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.ids: list[int] = []
        self.sent = ""

    def feed(self, ids: list[int]) -> str | None:
        """Take new ids; the text they add (possibly empty), or None while a character is incomplete."""
        self.ids.extend(ids)
        text = self.lm.decode_text(self.ids)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return None
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def rest(self, text: str) -> str:
        """What of the final ``text`` has not been handed on yet."""
        return text[len(self.sent) :]


class CALMLanguageModel(LanguageModel):
    """CALM: K tokens per step, likelihood-free temperature sampling (paper §6), no likelihood.

    ``greedy_temperature`` (in (0, 1]) is what greedy requests sample at.
    """

    kind = "calm"
    has_likelihood = False

    def __init__(self, model: CALM, tokenizer: Any, greedy_temperature: float = CALM_GREEDY_TEMPERATURE) -> None:
        super().__init__(model, tokenizer)
        self.check_temperature(greedy_temperature)
        self.greedy_temperature = greedy_temperature

    @property
    def tokens_per_step(self) -> int:
        return self.model.chunk_size

    def describe_context(self) -> str:
        return f"{self.context_steps} steps of {self.tokens_per_step} tokens"

    def max_new_tokens(self, num_prompt_ids: int) -> int:
        K = self.tokens_per_step
        # prompt chunks + new chunks - 1 <= max_seq_len: the last new chunk is never fed back
        return (self.context_steps + 1 - -(-num_prompt_ids // K)) * K

    def check_temperature(self, temperature: float) -> None:
        if not 0.0 < temperature <= 1.0:
            raise LanguageModelError(
                f"temperature must be in (0, 1] for CALM, got {temperature}: likelihood-free sampling can only "
                "sharpen the model's distribution (1 = plain sampling, 0.5 = sharper); CALM has no greedy "
                "decoding, so ask for a small temperature such as 0.01 instead of 0",
                "temperature",
            )

    def set_head_steps(self, steps: int) -> None:
        self.model.config = self.model.head.config = with_sampling_steps(self.model.config, steps)

    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float,
        num_samples: int,
        sampler: str,
        generator: torch.Generator,
        stop_ids: frozenset[int],
        on_tokens: OnTokens | None = None,
        stats: list[SamplingStats] | None = None,
    ) -> tuple[list[list[int]], list[bool]]:
        """All prompts in one batch, left-padded with BOS to one length, a multiple of K."""
        return generate_rows(
            self.model,
            left_pad_to_chunks(prompts, self.tokens_per_step, self.tokenizer.bos_id),
            max_new_tokens,
            temperature=temperature,
            num_samples=num_samples,
            sampler=sampler,
            stop_ids=stop_ids,
            generator=generator,
            use_cache=True,
            on_chunk=on_tokens,
            stats=stats,
        )


class TokenLanguageModel(LanguageModel):
    """A next-token model (the GPT baseline): softmax sampling at T in [0, 2], greedy at T = 0."""

    kind = "gpt"
    has_likelihood = True
    greedy_temperature = 0.0

    @property
    def tokens_per_step(self) -> int:
        return 1

    def describe_context(self) -> str:
        return f"{self.context_steps} tokens"

    def max_new_tokens(self, num_prompt_ids: int) -> int:
        return self.context_steps - num_prompt_ids

    def check_temperature(self, temperature: float) -> None:
        if not 0.0 <= temperature <= TOKEN_LM_MAX_TEMPERATURE:
            raise LanguageModelError(
                f"temperature must be in [0, {TOKEN_LM_MAX_TEMPERATURE:g}] for the GPT, got "
                f"{temperature} (0 = greedy decoding, 1 = plain sampling)",
                "temperature",
            )

    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        temperature: float,
        num_samples: int,
        sampler: str,
        generator: torch.Generator,
        stop_ids: frozenset[int],
        on_tokens: OnTokens | None = None,
        stats: list[SamplingStats] | None = None,
    ) -> tuple[list[list[int]], list[bool]]:
        """One prompt at a time (no padding), in order, sharing ``generator``; ``num_samples`` and
        ``sampler`` are CALM's and unused here."""
        out, stopped = [], []
        for i, row_ids in enumerate(prompts):
            row_stream = None if on_tokens is None else (lambda _, token, i=i: on_tokens(i, [token]))
            new = self.model.generate(
                torch.tensor([row_ids], device=self.device),
                max_new_tokens,
                temperature=temperature,
                generator=generator,
                stop_ids=stop_ids,
                on_token=row_stream,
            )[0, len(row_ids) :].tolist()
            cut = next((j for j, token in enumerate(new) if token in stop_ids), None)
            out.append(new if cut is None else new[:cut])
            stopped.append(cut is not None)
        return out, stopped

    def step_logits(
        self,
        ids: torch.Tensor,
        cache: Any,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Incremental next-token logits: ids (1, t) continuing ``cache`` -> logits (1, t, V).

        ``positions`` (t,) and ``attn_mask`` (t, cached + t) let BrierLM's rollouts attend to their
        own prefix only (``calm.eval.brier``).
        """
        m = self.model
        return m.lm_head(m.backbone(m.embed_tokens(ids), cache, positions=positions, attn_mask=attn_mask))

    def new_cache(self, max_len: int) -> Any:
        """An empty KV cache for one sequence of up to ``max_len`` tokens, for :meth:`step_logits`."""
        return self.model.backbone.new_cache(1, max_len=max_len)


def as_language_model(
    model: Any,
    tokenizer: Any,
    *,
    name: str | None = None,
    greedy_temperature: float = CALM_GREEDY_TEMPERATURE,
) -> LanguageModel:
    """The one place that decides the model kind: a CALM or a GPT (with its tokenizer) -> its interface.

    ``name`` (e.g. the checkpoint path) names the model in errors; ``greedy_temperature`` is what
    CALM samples at for greedy requests (the GPT decodes greedily by argmax). Raises
    :class:`LanguageModelError` for an autoencoder or any other module.
    """
    if isinstance(model, CALM):
        return CALMLanguageModel(model, tokenizer, greedy_temperature)
    if isinstance(model, GPT):
        return TokenLanguageModel(model, tokenizer)
    what = name or f"this {type(model).__name__}"
    if isinstance(model, Autoencoder):
        raise LanguageModelError(
            f"{what} is an autoencoder; pass a CALM or GPT checkpoint (an autoencoder only encodes and decodes "
            "chunks; `calm eval-ae` measures its reconstruction)",
            "model",
        )
    raise LanguageModelError(
        f"{what} is a {type(model).__name__}, not a CALM or GPT model; pass a CALM or GPT checkpoint", "model"
    )


def load_language_model(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    *,
    greedy_temperature: float = CALM_GREEDY_TEMPERATURE,
    dtype: str | None = None,
    raw_prompt: bool = False,
) -> LanguageModel:
    """Load a CALM or GPT checkpoint (or run directory) as a :class:`LanguageModel` (``calm.checkpoint.load_model``).

    ``dtype`` (``"fp32"`` or ``"bf16"``) casts the weights as they are read; None keeps the checkpoint's.
    A checkpoint fine-tuned with a prompt template (``calm finetune --prompt-template``) applies it to
    every prompt, as in training, unless ``raw_prompt``.
    """
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise LanguageModelError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}", "dtype")
    model, tokenizer, config = load_model(checkpoint, device, dtype=None if dtype is None else WEIGHT_DTYPES[dtype])
    lm = as_language_model(model, tokenizer, name=str(checkpoint), greedy_temperature=greedy_temperature)
    finetune = config.get("finetune") or {}
    template = finetune.get("prompt_template")
    if template and template != DEFAULT_PROMPT_TEMPLATE and not raw_prompt:
        lm.prompt_template = compile_template(template, "checkpoint's prompt template")
    if finetune.get("chat_template"):
        lm.chat_template = compile_template(finetune["chat_template"], "checkpoint's chat template")
    return lm


def complete(
    model: Any,
    tokenizer: Any,
    prompts: str | list[str],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    num_samples: int = 200,
    sampler: str = "batch",
    seed: int | None = None,
    stream: Callable[[str], None] | None = None,
    stop_at_document_end: bool = True,
) -> list[Completion]:
    """Text in, :class:`Completion` (text, token ids, finish reason) out, for a CALM or GPT model.

    Each prompt is encoded as ``[BOS] + tokens``. ``temperature``: CALM needs (0, 1] (likelihood-free
    sampling with ``num_samples`` candidates and ``sampler``, paper §6); the GPT takes [0, 2] and
    divides its logits by it (0 = greedy). ``seed`` fixes the draws (None: fresh entropy). ``stream``
    receives decoded text of the first prompt as it is produced. ``stop_at_document_end`` ends a
    continuation when the model emits BOS or EOS (the end of a document); False keeps going across
    documents (the boundary tokens are still not in the text). Raises :class:`LanguageModelError` for
    a request the model cannot serve (the rules: module docstring). A single string is one prompt (a
    list of one completion comes back).
    """
    return as_language_model(model, tokenizer).complete(
        [prompts] if isinstance(prompts, str) else prompts,
        max_new_tokens,
        temperature=temperature,
        num_samples=num_samples,
        sampler=sampler,
        seed=seed,
        stream=stream,
        stop_at_document_end=stop_at_document_end,
    )


def generate_text(
    model: Any,
    tokenizer: Any,
    prompts: str | list[str],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    num_samples: int = 200,
    sampler: str = "batch",
    seed: int | None = None,
    stream: Callable[[str], None] | None = None,
    stop_at_document_end: bool = True,
) -> list[str]:
    """Text in, text out: the batch-use Python entry point of ``calm generate`` (CALM or GPT).

    ``generate_text(model, tokenizer, ["The history of the city"], 64, temperature=0.5)`` with the
    ``model, tokenizer`` of ``calm.checkpoint.load_model``. Takes the arguments of :func:`complete`
    (a single string is one prompt) and returns only the texts.
    """
    completions = complete(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        temperature=temperature,
        num_samples=num_samples,
        sampler=sampler,
        seed=seed,
        stream=stream,
        stop_at_document_end=stop_at_document_end,
    )
    return [c.text for c in completions]
