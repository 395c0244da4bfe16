"""Load test of ``calm serve``: concurrent streaming clients against a batched and an unbatched server.

For each size (``tiny``: the demo-sized presets of ``calm bench``, a 4,096-entry BPE trained on the
shipped WikiText-103 test text; ``S``: the S presets with the Llama-3 tokenizer, 128,257 entries)
and each kind (CALM, the GPT with the same backbone), a checkpoint with random, seeded weights is
written (``calm.bench.build_pair``: random weights cost what trained ones cost per step; they stop
at BOS/EOS at random, so ``max_tokens`` bounds most requests). Then ``python -m calm serve`` runs in
a subprocess on a free 127.0.0.1 port, twice:

- **batched**: the default continuous batching (``--max-batch 32``), under 1, 8 and 32 clients;
- **unbatched**: ``--max-batch 1``, one sequence at a time (what the server did before batching),
  under the largest client count.

Each client sends ``--requests`` streaming requests one after another (``httpx``, the events parsed with
``json``: a light load generator, since it shares the server's CPU); request r of client c has seed 1000
c + r and one of four prompts. Every temperature of ``--temperatures`` is run (CALM at T < 1 uses Alg. 2
with ``--num-samples`` candidates). Reported per run: output tokens/s (completion tokens of all
responses / wall time), requests/s, p50/p95 time to first text and end-to-end latency (request sent ->
``[DONE]``). Every response is checked for completeness (a finish reason and usage before ``[DONE]``)
and for equality with the same request run alone in this process (``LanguageModel.complete``:
``calm.generate.engine`` for CALM, ``GPT.generate`` for the GPT) after the servers stop, so the check
does not share their CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/serve_load.py --sizes tiny --threads 2
    PYTHONPATH=. .venv/bin/python benchmarks/serve_load.py --sizes S --temperatures 1 --threads 2

Prints one JSON object (``--out`` also writes it) and exits 1 if any response was incomplete or wrong.
Not part of the test suite; the S runs take tens of minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import torch

from calm.bench import build_pair
from calm.bench.common import device_description
from calm.checkpoint import save_checkpoint
from calm.data.corpus import iter_documents
from calm.data.evalsets import WIKITEXT103_TEST
from calm.data.tokenizer import llama3_tokenizer, train_bpe
from calm.generate.lm import load_language_model
from calm.io import atomic_write_text, to_json

PROMPTS = [
    "The history of the city",
    " = Robert Boulter = \n \n Robert Boulter is an English film and television actor .",
    "In 1933 the hurricane",
    "The orchestra",
]


def build_checkpoints(size: str, out: Path) -> dict[str, Path]:
    """Random-weight CALM and GPT checkpoints of ``size`` with their tokenizer (module docstring)."""
    if size == "tiny":
        tokenizer = train_bpe(list(iter_documents([WIKITEXT103_TEST], max_words=None)), vocab_size=4096)
    else:
        tokenizer = llama3_tokenizer()
    calm, gpt = build_pair(size)
    if tokenizer.vocab_size > calm.config.vocab_size:
        raise SystemExit(
            f"the tokenizer has {tokenizer.vocab_size} entries, the {size} preset {calm.config.vocab_size}"
        )
    paths = {}
    for kind, model in (("calm", calm), ("gpt", gpt)):
        config = {"kind": kind, "model": asdict(model.config), "tokenizer_sha256": tokenizer.sha256}
        if kind == "calm":
            config["autoencoder"] = asdict(calm.autoencoder.config)
        paths[kind] = save_checkpoint(
            out / f"{size}-{kind}", model=model, config=config, tokenizer_json=tokenizer.to_str()
        )
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, threads: int, max_batch: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "calm", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    cmd += ["--model-name", "m", "--max-batch", str(max_batch), "--threads", str(threads), "--max-queue", "256"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not answer within 300 s")


def request_body(kind: str, client_id: int, r: int, args: argparse.Namespace, temperature: float) -> dict[str, Any]:
    body = dict(
        prompt=PROMPTS[(client_id + r) % len(PROMPTS)], max_tokens=args.max_tokens, temperature=temperature,
        seed=1000 * client_id + r,
    )  # fmt: skip
    if kind == "calm":
        body["num_samples"] = args.num_samples
    return body


def run_client(url: str, bodies: list[dict[str, Any]], records: list[dict]) -> None:
    """Send ``bodies`` one after another, streaming; read the server-sent events with ``httpx`` and ``json``
    (the ``openai`` client parses each event into pydantic models, CPU this 2-core machine's server needs)."""
    with httpx.Client(base_url=url, timeout=3600) as client:
        for body in bodies:
            start = time.perf_counter()
            first, text, finish, usage = None, [], None, None
            payload = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, **body}
            with client.stream("POST", "/completions", json=payload) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    usage = event.get("usage") or usage
                    for choice in event["choices"]:
                        if choice["text"]:
                            first = first or time.perf_counter()
                            text.append(choice["text"])
                        finish = choice["finish_reason"] or finish
            end = time.perf_counter()
            tokens = usage["completion_tokens"] if usage else None
            records.append(dict(body=body, text="".join(text), finish=finish, tokens=tokens, latency=end - start,
                                first=(first or end) - start))  # fmt: skip


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def load(url: str, kind: str, clients: int, args: argparse.Namespace, temperature: float) -> tuple[dict, list]:
    """``clients`` threads, ``args.requests`` requests each; the run's figures and its records."""
    records: list[dict] = []
    plan = [[request_body(kind, c, r, args, temperature) for r in range(args.requests)] for c in range(clients)]
    threads = [threading.Thread(target=run_client, args=(url, bodies, records)) for bodies in plan]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    tokens = sum(r["tokens"] or 0 for r in records)
    figures = {
        "clients": clients,
        "requests": len(records),
        "complete": sum(1 for r in records if r["finish"] in ("stop", "length") and r["tokens"] is not None),
        "wall_s": round(wall, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(records) / wall, 3),
        "first_text_p50_s": round(percentile([r["first"] for r in records], 50), 3),
        "first_text_p95_s": round(percentile([r["first"] for r in records], 95), 3),
        "latency_p50_s": round(percentile([r["latency"] for r in records], 50), 3),
        "latency_p95_s": round(percentile([r["latency"] for r in records], 95), 3),
    }
    return figures, records


def serve_and_load(checkpoint: Path, kind: str, max_batch: int, clients: list[int], args: argparse.Namespace) -> list:
    """One server with ``--max-batch max_batch``; every temperature x client count against it."""
    port = free_port()
    server = start_server(checkpoint, port, args.threads, max_batch)
    url = f"http://127.0.0.1:{port}/v1"
    runs = []
    try:
        run_client(url, [request_body(kind, 99, 0, args, 1.0)], [])  # warm-up, not counted
        for temperature in args.temperatures:
            for c in clients:
                figures, records = load(url, kind, c, args, temperature)
                figures = {"max_batch": max_batch, "temperature": temperature, **figures}
                print(to_json(figures), file=sys.stderr, flush=True)
                runs.append((figures, records))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return runs


def check(checkpoint: Path, runs: list, args: argparse.Namespace) -> None:
    """Each response against the same request alone (``LanguageModel.complete``), computed once per request."""
    torch.set_num_threads(args.threads)
    lm = load_language_model(checkpoint)
    alone: dict[tuple, Any] = {}
    for figures, records in runs:
        wrong = 0
        for rec in records:
            b = rec["body"]
            key = (b["prompt"], b["seed"], b["temperature"])
            if key not in alone:
                (alone[key],) = lm.complete(
                    [b["prompt"]], b["max_tokens"], temperature=b["temperature"], seed=b["seed"],
                    num_samples=b.get("num_samples", 200),
                )  # fmt: skip
            ref = alone[key]
            same = (rec["text"], rec["finish"], rec["tokens"]) == (ref.text, ref.finish_reason, len(ref.token_ids))
            wrong += not same
        figures["equal_to_alone"] = len(records) - wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny"], choices=["tiny", "S"])
    parser.add_argument("--kinds", nargs="+", default=["calm", "gpt"], choices=["calm", "gpt"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--num-samples", type=int, default=200, help="CALM's N at T < 1 (Alg. 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server and of the check")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the --max-batch 1 server")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            checkpoints = build_checkpoints(size, Path(tmp))
            for kind in args.kinds:
                runs = serve_and_load(checkpoints[kind], kind, 32, args.clients, args)
                if not args.no_unbatched:
                    runs += serve_and_load(checkpoints[kind], kind, 1, [max(args.clients)], args)
                check(checkpoints[kind], runs, args)
                results += [{"size": size, "kind": kind, **figures} for figures, _ in runs]
    result = {
        "device": device_description(torch.device("cpu")),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "num_samples": args.num_samples,
        "requests_per_client": args.requests,
        "runs": results,
    }
    text = to_json(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    bad = [r for r in results if r["complete"] != r["requests"] or r["equal_to_alone"] != r["requests"]]
    if bad:
        print(f"{len(bad)} runs had incomplete or wrong responses", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
