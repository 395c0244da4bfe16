"""Prompt/answer examples for fine-tuning: reading them, rendering chats, and the chunk-aligned encoding.

Ours: the paper and the official code have no fine-tuning path (the official labels are the input ids,
unmasked). Two kinds of JSONL line are read, with field names the user can choose:

- ``{"prompt": ..., "completion": ...}``: the prompt text goes through the *prompt template* (Jinja,
  default ``{{ prompt }}``), which the fine-tuned checkpoint stores so that ``calm generate`` and
  ``calm serve`` wrap a raw prompt the same way;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the last message must be the assistant's
  answer; the ones before it are rendered by the *chat template* (Jinja over ``messages``), also stored.

**The encoding** (:func:`encode_example`). The prompt is ``[BOS] + tokens(prompt)``, the answer
``tokens(completion) + [EOS]``. The loss sees only the answer: for the GPT, its tokens; for CALM, its
chunks. A CALM answer that began inside a chunk would share that chunk's latent with the end of the
prompt, so that a token-level mask could not be carried to chunks. The prompt is therefore left-padded
with BOS to a multiple of K, which is exactly what CALM generation does to every prompt
(``calm.generate.engine.left_pad_to_chunks``): the answer starts on a chunk boundary, every chunk the
loss sees is the answer's, and a fine-tuned model is served as it was trained. The answer is then
right-padded with PAD to a multiple of K, as the autoencoder's own packing pads each document after
its EOS. The cost is (−len(prompt)) mod K padding tokens before the prompt and up to K − 1 after the
answer: on average K − 1 tokens per example (3 at K = 4).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from calm.data.tokenizer import Tokenizer

DEFAULT_PROMPT_TEMPLATE = "{{ prompt }}"
DEFAULT_CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
"""The chat template used when none is given: one ``role: content`` line per message, then ``assistant:``."""


class ExampleError(ValueError):
    """A fine-tuning data file or template that cannot be used; the message names the line and the fix."""


@dataclass(frozen=True)
class Example:
    """One prompt (already rendered by its template) and the answer the model should learn to give."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Fields:
    """The JSONL field names (``--prompt-field``, ``--completion-field``, ``--messages-field``)."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


def compile_template(text: str, what: str) -> jinja2.Template:
    """A Jinja template (sandboxed, undefined names are errors); raises ExampleError naming ``what``."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(text)
    except jinja2.TemplateError as e:
        raise ExampleError(
            f"the {what} does not parse: {e}; it is a Jinja template such as {DEFAULT_PROMPT_TEMPLATE!r}"
        ) from None


def render(template: jinja2.Template, what: str, **values: Any) -> str:
    try:
        return template.render(**values)
    except jinja2.TemplateError as e:
        names = ", ".join(values)
        raise ExampleError(f"the {what} does not render: {e}; it may use {names}") from None


def read_examples(
    path: str | Path,
    fields: Fields = Fields(),
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
) -> list[Example]:
    """The examples of a JSONL file, templates applied (module docstring).

    Raises ExampleError for a missing file, a line that is not JSON or has neither prompt/completion nor
    messages, an empty answer, and a template that does not parse or render; the message names the line.
    """
    path = Path(path)
    if not path.is_file():
        raise ExampleError(f"fine-tuning data {path} does not exist; pass a JSONL file of prompt/completion pairs")
    prompt_t = compile_template(prompt_template, "prompt template")
    chat_t = compile_template(chat_template, "chat template")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ExampleError(f"{where} is not JSON ({e.msg}); each line must be one JSON object") from None
            examples.append(_example(row, fields, prompt_t, chat_t, where))
    if not examples:
        raise ExampleError(f"{path} has no examples; each line must be a JSON object with a prompt and a completion")
    return examples


def _example(row: Any, fields: Fields, prompt_t: jinja2.Template, chat_t: jinja2.Template, where: str) -> Example:
    if isinstance(row, dict) and fields.messages in row:
        messages = row[fields.messages]
        if not (isinstance(messages, list) and messages and all(_is_message(m) for m in messages)):
            raise ExampleError(f"{where}: {fields.messages!r} must be a list of {{role, content}} objects")
        if messages[-1]["role"] != "assistant":
            raise ExampleError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
        prompt = render(chat_t, f"chat template (at {where})", messages=messages[:-1])
        completion = messages[-1]["content"]
    elif isinstance(row, dict) and fields.prompt in row and fields.completion in row:
        if not isinstance(row[fields.prompt], str) or not isinstance(row[fields.completion], str):
            raise ExampleError(f"{where}: {fields.prompt!r} and {fields.completion!r} must be strings")
        prompt = render(prompt_t, f"prompt template (at {where})", prompt=row[fields.prompt])
        completion = row[fields.completion]
    else:
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ExampleError(
            f"{where} has no {fields.prompt!r}/{fields.completion!r} pair and no {fields.messages!r} list (found "
            f"{found}); name your fields with --prompt-field/--completion-field or --messages-field"
        )
    if not completion.strip():
        raise ExampleError(f"{where} has an empty answer; every example needs a completion to learn")
    return Example(prompt, completion)


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


@dataclass(frozen=True)
class Encoded:
    """One example as ids: ``ids`` (prompt, answer, padding) and ``target`` (1 where the loss looks)."""

    ids: list[int]
    target: list[int]
    """Per token for the GPT; for CALM, per token too, constant within each chunk."""
    prompt_tokens: int
    """Tokens before the answer, left padding included."""
    padding: int
    """Tokens added to align the example to chunks (left BOS and right PAD); 0 for the GPT."""


def encode_example(tok: Tokenizer, example: Example, chunk_size: int = 1) -> Encoded:
    """``[BOS]*r + [BOS] + prompt + answer + [EOS] + [PAD]*s`` with r, s making both parts multiples of
    ``chunk_size`` (1 for the GPT: no padding); see the module docstring."""
    prompt = [tok.bos_id, *tok.encode(example.prompt)]
    answer = [*tok.encode(example.completion), tok.eos_id]
    left = (-len(prompt)) % chunk_size
    right = (-len(answer)) % chunk_size
    ids = [tok.bos_id] * left + prompt + answer + [tok.pad_id] * right
    start = left + len(prompt)
    target = [0] * start + [1] * (len(answer) + right)
    return Encoded(ids, target, start, left + right)


def split_examples(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split (at least one example on each side when there are two or more)."""
    import random

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(examples) - 1, max(1, round(len(examples) * val_fraction))) if val_fraction > 0 else 0
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [examples[i] for i in train], [examples[i] for i in val]
