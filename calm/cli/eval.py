"""``calm eval``, ``calm eval-ae``, ``calm follow``, ``calm flops``: measuring models.

BrierLM (paper §5; ``calm.eval.brier``), the autoencoder's reconstruction (``calm.eval.autoencoder``),
prompt following (ours; ``calm.eval.prompt_following``) and analytic FLOPs (Table 1 accounting;
``calm.models.flops``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from calm.checkpoint import load_model, read_config, resolve_checkpoint
from calm.config import (
    ConfigError,
    load_preset,
    parse_override,
)
from calm.data.evalsets import load_eval_documents, pack_documents_for_ae
from calm.eval.autoencoder import evaluate_autoencoder
from calm.eval.brier import evaluate_checkpoint
from calm.eval.prompt_following import format_table, prompt_following
from calm.generate.lm import load_language_model
from calm.io import read_json, to_json, write_json
from calm.models.flops import (
    PAPER_AE_TRAIN_TOKENS,
    PAPER_TRAIN_TOKENS,
    calm_flops,
    format_flops,
    gpt_flops,
    run_flops,
    training_context_steps,
)


def cmd_eval(args: argparse.Namespace) -> int:
    """BrierLM ± SE (and perplexity, bits per byte for token LMs) as a table; ``--json`` writes the result."""
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
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return 0


def cmd_eval_ae(args: argparse.Namespace) -> int:
    """Reconstruction accuracy of an autoencoder on evaluation text."""
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
        progress=args.json != "-" and not args.no_progress,
    )
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), **result}
    if args.json == "-":  # `--json` alone: the JSON object is the output
        print(to_json(result))
        return 0
    print(f"token accuracy (decode μ):       {result['token_accuracy']:.5f}")
    print(f"token accuracy (decode z ~ q):   {result['token_accuracy_sampled']:.5f}")
    print(f"chunk exact match (decode μ):    {result['chunk_exact_match']:.5f}")
    print(f"cross-entropy (decode μ):        {result['ce']:.5f}")
    print(f"text tokens evaluated:           {result['tokens']:,}")
    if args.json:
        write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return 0


def cmd_follow(args: argparse.Namespace) -> int:
    """Score checkpoints on the same prompts (``prompt_following``); print a table, optionally write JSON."""
    models, tokenizer, sha = {}, None, None
    for path in args.checkpoint:
        name = Path(path).resolve().name
        if name in models or name == "reference":
            name = str(path)
        lm = load_language_model(resolve_checkpoint(path))
        if sha is not None and lm.tokenizer.sha256 != sha:
            raise ValueError(
                f"{path} uses another tokenizer than {args.checkpoint[0]}; compare models of one tokenizer"
            )
        models[name], tokenizer, sha = lm.model, lm.tokenizer, lm.tokenizer.sha256
    result = prompt_following(
        models,
        tokenizer,
        args.data,
        num_prompts=args.num_prompts,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        temperature=args.temperature,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    print(format_table(result))
    for example in result["examples"][: args.show]:
        print(f"\nprompt: …{example['prompt'][-200:]!r}")
        for name in result["results"]:
            print(f"  {'real text' if name == 'reference' else name}: {example[name]!r}")
    if args.json:
        write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    """Analytic FLOPs per token of a preset or a trained checkpoint (paper Table 1 accounting)."""
    if args.checkpoint:
        if args.model or args.preset or args.set:
            raise ConfigError("calm flops takes --checkpoint DIR, or --model and --preset, not both")
        result, assumptions = _checkpoint_flops(args)
    elif not (args.model and args.preset):
        raise ConfigError("calm flops needs --checkpoint DIR, or --model gpt|calm and --preset NAME")
    else:
        result, assumptions = _preset_flops(args)
    if args.json:
        print(to_json({**result, "assumptions": assumptions}, indent=2))
        return 0
    for key, value in result.items():
        if isinstance(value, float | int) and not isinstance(value, bool) and abs(value) >= 1e4:
            value = format_flops(value) if "flops" in key else f"{value / 1e6:.1f}M"
        if not isinstance(value, dict):
            print(f"{key:<36} {value}")
    print(f"assumptions: {assumptions}")
    if result["model"] == "calm":
        print(
            "train_flops_total is the language model's training (the paper's accounting, held equal when CALM "
            "is compared with a Transformer); train_flops_total_with_autoencoder adds the autoencoder's."
        )
    return 0


def _preset_flops(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    overrides = {"model.vocab_size": args.vocab_size} if args.vocab_size else {}
    model_overrides = dict(parse_override(text) for text in args.set or [])
    if any(not key.startswith("model.") for key in model_overrides):
        raise ConfigError(f"calm flops --set takes model.KEY=VALUE only, got {sorted(model_overrides)}")
    train_tokens = args.train_tokens or PAPER_TRAIN_TOKENS
    if args.model == "gpt":
        cfg = load_preset("gpt", args.preset, {**model_overrides, **overrides}).model
        context = args.context or cfg.max_seq_len
        result = gpt_flops(cfg, context=context, train_tokens=train_tokens)
        ae_text = ""
    else:
        cfg = load_preset("calm", args.preset, {**model_overrides, **overrides}).model
        cfg.validate()
        ae = load_preset("autoencoder", args.autoencoder_preset, overrides).model
        cfg = dataclasses.replace(cfg, chunk_size=ae.chunk_size, latent_size=ae.latent_size)
        context = args.context or cfg.max_seq_len
        ae_tokens = args.ae_train_tokens or PAPER_AE_TRAIN_TOKENS
        result = calm_flops(
            cfg, ae, context=context, num_samples_inference=args.num_samples, train_tokens=train_tokens,
            ae_train_tokens=ae_tokens,
        )  # fmt: skip
        preset = args.autoencoder_preset
        ae_text = f", autoencoder preset {preset!r} trained on {ae_tokens:.3g} tokens (--ae-train-tokens)"
    assumptions = (
        f"vocabulary {cfg.vocab_size:,} (--vocab-size), context {context:,} steps (--context), "
        f"{train_tokens:.3g} training tokens (--train-tokens){ae_text}"
    )
    return {"model": args.model, "preset": args.preset, **result}, assumptions


def _checkpoint_flops(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """A trained model's FLOPs: its own config, its training context, the tokens it has seen."""
    path = resolve_checkpoint(args.checkpoint)
    config = read_config(path)
    state = read_json(path / "training_state.json") if (path / "training_state.json").exists() else {}
    tokens = args.train_tokens or float(state.get("tokens_seen", 0))
    if config["kind"] not in ("calm", "gpt"):
        raise ConfigError(f"{path} is an autoencoder checkpoint; calm flops takes a CALM or GPT checkpoint")
    context = args.context or training_context_steps(config)
    ae_tokens = args.ae_train_tokens or 0.0
    result = run_flops(
        config, context=context, train_tokens=tokens, ae_train_tokens=ae_tokens, num_samples_inference=args.num_samples
    )
    result.pop("kind")
    ae_text = ""
    if config["kind"] == "calm":
        if not args.ae_train_tokens:  # a CALM checkpoint does not know how long its autoencoder trained
            for key in ("ae_train_flops_total", "train_flops_total_with_autoencoder"):
                result.pop(key)
        ae_text = (
            f", its autoencoder trained on {ae_tokens:.3g} tokens (--ae-train-tokens)"
            if args.ae_train_tokens
            else "; pass --ae-train-tokens N for the autoencoder's training"
        )
    assumptions = (
        f"{path}: its vocabulary {config['model']['vocab_size']:,}, context {context:,} steps (its training blocks), "
        f"{tokens:,.0f} training tokens (step {state.get('step', '?')}){ae_text}"
    )
    return {"model": config["kind"], "checkpoint": str(path), **result}, assumptions


def _eval_arguments(p: argparse.ArgumentParser) -> None:
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


def _eval_ae_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--data", required=True, help="text/jsonl/json file, or a prepared data dir (val split)")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the result as JSON to PATH, as `calm eval --json PATH` does; `--json` alone prints it instead",
    )
    p.add_argument("--max-chunks", type=int, help="evaluate only the first N chunks")
    p.add_argument("--seed", type=int, default=0, help="seed for the posterior samples")
    p.add_argument("--no-progress", action="store_true")


def _follow_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", nargs="+", required=True, help="CALM and/or GPT checkpoints or run directories")
    p.add_argument("--data", required=True, help="prepared data directory: prompts from val, background from train")
    p.add_argument("--num-prompts", type=int, default=128, help="validation documents to prompt with (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="continuation length in tokens (default 32)")
    p.add_argument("--temperature", type=float, default=0.5, help="sampling temperature (default 0.5)")
    p.add_argument("--num-samples", type=int, default=200, help="CALM: N of the batch approximation (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=3, help="example continuations to print (default 3)")
    p.add_argument("--json", help="write the full result (settings, scores, examples) here")


def _flops_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="a trained CALM or GPT (checkpoint or run directory): its own config")
    p.add_argument("--model", choices=["gpt", "calm"], help="with --preset: a preset's FLOPs")
    p.add_argument("--preset")
    p.add_argument("--autoencoder-preset", default="paper")
    p.add_argument("--context", type=int, help="context in steps (default: the preset's max_seq_len)")
    p.add_argument("--vocab-size", type=int, help="default: the preset's (128,257, Llama-3 + PAD)")
    p.add_argument("--num-samples", type=int, default=1, help="head samples per step at inference")
    p.add_argument(
        "--train-tokens",
        type=float,
        help="training tokens of the totals (default: a checkpoint's own; a preset: the paper's 5.24e11)",
    )
    p.add_argument(
        "--ae-train-tokens",
        type=float,
        help=f"CALM: the autoencoder's training tokens (presets: default the paper's {PAPER_AE_TRAIN_TOKENS:.3g})",
    )
    p.add_argument(
        "--set", action="append", metavar="model.KEY=VALUE", help="override, e.g. model.head=flow or model.input=both"
    )
    p.add_argument("--json", action="store_true")


ARGUMENTS = {
    "eval": _eval_arguments,
    "eval-ae": _eval_ae_arguments,
    "follow": _follow_arguments,
    "flops": _flops_arguments,
}
