"""An lm-evaluation-harness model for calm checkpoints: ``lm_eval --model calm --model_args pretrained=DIR``.

- ``generate_until`` for CALM and the GPT, through :class:`calm.generate.completion.TextCompleter` (the same
  path as ``calm serve``): BOS + context, stop at the task's ``until`` strings or EOS. Greedy
  requests (``do_sample=False``, or temperature 0 without ``do_sample=True``) use the model's
  ``greedy_temperature`` (``calm.generate.lm``): the GPT decodes by argmax; CALM has no argmax, so
  they use the batch approximation (paper Alg. 2) at ``greedy_temperature`` (default 0.01), i.e.
  the most frequent of ``num_samples`` candidate chunks, the T -> 0 limit of likelihood-free
  temperature sampling (paper §6). Other temperatures follow the model's rules: CALM samples
  at T in (0, 1] only and refuses anything else (``do_sample=True`` with temperature 0 included)
  with the message ``calm generate`` and ``calm serve`` give. Every request has its own seed
  (``seed`` + its index), and ``batch_size`` requests are decoded together (continuous batching), each
  giving the text it gives alone.
- ``loglikelihood`` and ``loglikelihood_rolling`` for the GPT, from its softmax.
- CALM has no likelihood (its energy head defines P(next chunk) only implicitly), so it cannot score
  multiple-choice or perplexity tasks: those requests raise :class:`CALMHasNoLikelihood`, which names
  generative tasks that work. BrierLM, CALM's likelihood-free metric, is ``calm eval``.

Registration: importing this module registers the model as ``calm`` (``@register_model``), and
the distribution declares it under the ``lm_eval.models`` entry-point group. lm-eval's plugin
discovery of that group (upstream pull request 4013) was merged after the 0.4.13 release; with a
version that has it, ``lm_eval --model calm`` works as soon as both are installed. lm-eval 0.4.13
finds models only in its own list (``lm_eval --model calm`` fails there with "no model for this
name found"), so the ``calm-lm-eval`` console script registers the model and then runs lm-eval's
own command line with the same arguments.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from calm.generate.batching import Batcher
from calm.generate.completion import TextCompleter
from calm.generate.lm import LanguageModel, load_language_model

#: Generative lm-eval tasks (``output_type: generate_until``) that CALM can run.
GENERATIVE_TASKS = ("gsm8k", "triviaqa", "nq_open", "drop", "coqa", "squadv2")


class CALMHasNoLikelihood(NotImplementedError):
    """A likelihood was asked of CALM, whose energy head cannot evaluate one."""

    def __init__(self, request_type: str) -> None:
        super().__init__(
            f"{request_type} needs log-probabilities, and CALM has none: its energy head defines the next "
            "chunk's distribution only implicitly (it can sample it, not evaluate it). Multiple-choice and "
            "perplexity tasks (output_type loglikelihood, multiple_choice or loglikelihood_rolling) cannot be "
            f"scored; run generative tasks (output_type generate_until) such as {', '.join(GENERATIVE_TASKS)}, "
            "or score the model with BrierLM: calm eval --checkpoint DIR --data FILE"
        )


@register_model("calm")
class CALMLM(LM):
    """A calm checkpoint (CALM or GPT, a run directory or one checkpoint) as an lm-eval model.

    Args (``--model_args``): ``pretrained`` the checkpoint; ``device`` (default cpu);
    ``batch_size`` sequences per forward pass when scoring the GPT, and generations decoded together;
    ``num_samples`` and ``sampler``
    (``batch`` | ``exact``) for CALM's temperature; ``greedy_temperature`` what CALM uses for greedy
    requests; ``max_gen_toks`` the default generation length; ``seed`` the base seed.
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str | None = 8,
        num_samples: int = 200,
        sampler: str = "batch",
        greedy_temperature: float = 0.01,
        max_gen_toks: int = 256,
        seed: int = 0,
        max_batch_size: Any = None,  # passed by lm-eval; one fixed batch size is used here
    ) -> None:
        super().__init__()
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's default device is cuda
        self.language_model: LanguageModel = load_language_model(
            str(pretrained), device, greedy_temperature=float(greedy_temperature)
        )
        self.completer = TextCompleter(self.language_model)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples, self.sampler = int(num_samples), sampler
        self.max_gen_toks, self.seed = int(max_gen_toks), seed
        greedy = self.language_model.greedy_temperature
        self.language_model.check_request(1, 1, temperature=greedy, num_samples=self.num_samples, sampler=sampler)

    # ------------------------------------------------------------------ generation

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, float]:
        """(stop strings, max new tokens, temperature) from a task's generation kwargs."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        aliases = ("max_gen_toks", "max_new_tokens", "max_tokens")
        max_new = int(next((gen_kwargs[k] for k in aliases if gen_kwargs.get(k)), self.max_gen_toks))
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        do_sample = gen_kwargs.get("do_sample")
        if do_sample is False or (temperature == 0.0 and do_sample is not True):  # lm-eval's greedy request
            temperature = self.language_model.greedy_temperature
        self.language_model.check_temperature(temperature)
        return until, max_new, temperature

    def _fit(self, context: str, max_new: int) -> tuple[str, int]:
        """Shorten the generation to half the context at most, then drop the context's oldest tokens to fit."""
        lm = self.language_model
        max_new = max(1, min(max_new, lm.context_tokens // 2))
        ids = lm.encode_prompt(context)[1:]
        keep = len(ids)
        while keep > 0 and lm.max_new_tokens(keep + 1) < max_new:
            keep -= 1
        if keep < len(ids):
            context = lm.tokenizer.decode(ids[len(ids) - keep :])
        return context, max_new

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its ``until`` strings (excluded), EOS or ``max_gen_toks``.

        ``batch_size`` requests are decoded together (continuous batching, ``calm.generate.batching``);
        request i draws from its own generator seeded ``seed + i``, so its text is what it gives alone.
        """
        sequences, sinks = [], []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            until, max_new, temperature = self._generation_settings(dict(gen_kwargs))
            context, max_new = self._fit(context, max_new)
            seq, sink = self.completer.prepare(
                context, max_new, temperature=temperature, stop=until, seed=self.seed + index,
                num_samples=self.num_samples, sampler=self.sampler,
            )  # fmt: skip
            sequences.append(seq)
            sinks.append(sink)
        batcher = Batcher(self.language_model, max_batch=self.batch_size)
        futures = [batcher.submit(seq) for seq in sequences]
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            while batcher.active or batcher.waiting:
                batcher.step()
        out = []
        for request, sink, future in zip(requests, sinks, futures, strict=True):
            text = sink.result(future.result()).text
            out.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out

    # ------------------------------------------------------------------ likelihoods (GPT only)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (BOS + context, continuation), with the context's trailing spaces moved to the
        continuation (a byte-level BPE attaches a space to the word after it)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        tok = self.language_model.tokenizer
        whole = tok.encode(context + continuation)
        context_ids = tok.encode(context)
        return [tok.bos_id] + whole[: len(context_ids)], whole[len(context_ids) :]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log P(continuation | context) and whether greedy decoding gives the continuation.

        Sequences longer than the context window keep their last ``max_seq_len + 1`` tokens.
        Batches right-pad; under causal attention padding after a sequence changes none of its logits.
        """
        model = self.language_model.model
        window = self.language_model.context_steps
        device = next(model.parameters()).device
        results: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            batch = pairs[start : start + self.batch_size]
            inputs = [(ctx + cont)[-(window + 1) :][:-1] for ctx, cont in batch]
            width = max(len(x) for x in inputs)
            ids = torch.full((len(batch), width), self.language_model.tokenizer.pad_id, dtype=torch.long, device=device)
            for row, x in enumerate(inputs):
                ids[row, : len(x)] = torch.tensor(x, device=device)
            logprobs = F.log_softmax(model(ids).float(), dim=-1)  # (B, T, V)
            for row, ((_, cont), x) in enumerate(zip(batch, inputs)):
                if not cont:
                    results.append((0.0, True))
                    continue
                rows = logprobs[row, len(x) - len(cont) : len(x)]  # positions predicting cont
                target = torch.tensor(cont, device=device)
                total = rows.gather(1, target[:, None]).sum().item()
                results.append((total, bool((rows.argmax(-1) == target).all())))
        return results

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) per request; GPT only."""
        if not self.language_model.has_likelihood:
            raise CALMHasNoLikelihood("loglikelihood")
        pairs = [self._encode_pair(*request.args) for request in requests]
        results = self._score(pairs)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log P(text) of whole documents in disjoint windows of the context (BOS first); GPT only."""
        if not self.language_model.has_likelihood:
            raise CALMHasNoLikelihood("loglikelihood_rolling")
        tok = self.language_model.tokenizer
        window = self.language_model.context_steps
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = request.args[:1]
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(tok.encode(text), tok.bos_id, max_seq_len=window, context_len=1)
            ]
            total = sum(score for score, _ in self._score(windows))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out


def main(argv: list[str] | None = None) -> None:
    """``calm-lm-eval``: lm-eval's own command line, with the ``calm`` model registered first."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["calm-lm-eval", *argv]
    cli_evaluate()
