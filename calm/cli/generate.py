"""``calm generate`` and ``calm serve``: text from a CALM or GPT checkpoint, on the terminal or over HTTP.

Both go through the language-model interface (``calm.generate.lm``), so a request either command
refuses is refused with the same message by ``generate_text`` and the server: CALM samples at
temperatures in (0, 1] (likelihood-free sampling, paper §6), the GPT at [0, 2] with 0 = greedy.
"""

from __future__ import annotations

import argparse
import os
import sys

from calm.config import ConfigError
from calm.generate.lm import SAMPLERS, WEIGHT_DTYPES, load_language_model
from calm.generate.sampling import SamplingStats


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue ``--prompt``, streaming the text (``LanguageModel.complete``, as ``generate_text``)."""
    lm = load_language_model(args.checkpoint, dtype=args.dtype, raw_prompt=args.raw_prompt)
    if args.head_steps is not None:
        lm.set_head_steps(args.head_steps)
    lm.check_request(
        len(lm.encode_prompt(args.prompt)),
        args.max_new_tokens,
        temperature=args.temperature,
        num_samples=args.num_samples,
        sampler=args.sampler,
    )
    stream = None if args.quiet else (lambda text: print(text, end="", flush=True))
    if not args.quiet:
        print(args.prompt, end="", flush=True)
    (completion,) = lm.complete(
        [args.prompt],
        args.max_new_tokens,
        temperature=args.temperature,
        num_samples=args.num_samples,
        sampler=args.sampler,
        seed=args.seed,
        stream=stream,
        stop_at_document_end=not args.no_stop_at_document_end,
    )
    if args.quiet:
        print(args.prompt + completion.text)
    else:
        print()
    report_sampling(completion.sampling, args.num_samples)
    return 0


def report_sampling(stats: SamplingStats | None, num_samples: int) -> None:
    """After a CALM continuation at T < 1: how many steps fell back, on stderr, with a warning and the
    remedy when most did (Alg. 2 samples a step at T = 1 when all N candidates differ)."""
    if stats is None or stats.temperature == 1.0 or not stats.steps:
        return
    print(f"sampling: {stats.describe(num_samples)}", file=sys.stderr)
    if stats.fallback_fraction > 0.5:
        print(
            f"warning: most steps were not sampled at temperature {stats.temperature:g}; {stats.remedy()}",
            file=sys.stderr,
        )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a checkpoint until interrupted (``calm.interop.serve.serve``)."""
    try:  # the serve extra (fastapi, uvicorn) is optional
        from calm.interop.serve import API_KEY_ENV, serve
    except ImportError as e:
        raise ConfigError(f"calm serve needs the serve extra ({e}); pip install 'calm-lm[serve]'") from e
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.max_choices < 1:
        raise ConfigError(f"--max-choices must be >= 1, got {args.max_choices}")
    if args.max_queue < 1:
        raise ConfigError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.request_timeout < 0:
        raise ConfigError(f"--request-timeout must be >= 0 (0: no limit), got {args.request_timeout}")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    serve(
        args.checkpoint,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_choices=args.max_choices,
        dtype=args.dtype,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout or None,
        max_batch=args.max_batch,
    )
    return 0


def _dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=list(WEIGHT_DTYPES),
        help="cast the weights to this precision as they are read (default: the checkpoint's own)",
    )


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="CALM or GPT checkpoint / run directory")
    _dtype_argument(p)
    p.add_argument(
        "--raw-prompt", action="store_true", help="do not wrap the prompt in a fine-tuned checkpoint's prompt template"
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="CALM: in (0, 1], < 1 uses likelihood-free sampling; GPT: in [0, 2], 0 = greedy",
    )
    p.add_argument("--num-samples", type=int, default=200, help="N candidates for the batch approximation")
    p.add_argument("--sampler", choices=SAMPLERS, default="batch", help="Alg. 2 (batch) or Alg. 1 (exact)")
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true", help="print only the final text")
    p.add_argument(
        "--head-steps",
        type=int,
        help="sampling steps of a flow (midpoint steps) or diffusion (respaced steps) head; default: its config's",
    )
    p.add_argument(
        "--no-stop-at-document-end",
        action="store_true",
        help="keep generating after the model ends the document (BOS/EOS); special tokens are never printed",
    )


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="CALM or GPT checkpoint / run directory")
    _dtype_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $CALM_API_KEY; none if unset)")
    p.add_argument("--model-name", help="the model id clients send (default: the run directory's name)")
    p.add_argument("--max-choices", type=int, default=16, help="most completions (prompts x n) per request")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running; more get 503 + Retry-After")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (0: no limit)")
    p.add_argument(
        "--max-batch", type=int, default=32, help="sequences (choices) decoded together; more wait for a free row"
    )


ARGUMENTS = {"generate": _generate_arguments, "serve": _serve_arguments}
