"""Load test of ``calm serve``: C concurrent streaming clients x R requests each, on localhost.

Starts ``python -m calm serve`` in a subprocess on a free 127.0.0.1 port, on a checkpoint you pass
or, by default, on a demo-sized model with random (seeded) weights: the ``tiny`` presets of
``calm bench`` (CALM: 4 layers, d = 256, K = 4, V = 4,096; the GPT with the same backbone) with a
4,096-entry BPE trained on the shipped WikiText-103 test text. Random weights cost the same as
trained ones per step, but stop at EOS at random, so ``max_tokens`` bounds every request.

Each client sends its requests one after another, streaming, with the official ``openai`` client;
request r of client c has seed 1000 * c + r and one of a few prompts. Reports requests/s,
p50/p95 latency (request sent -> last event), time to first text, streamed tokens/s, the rate of
the same completions run directly in this process without HTTP (one after another), and checks
that every response was complete (a finish_reason and usage before ``[DONE]``) and correct: its
text, finish reason and token count equal those of the same completion computed in this process
after the load phase, for the same seed (for CALM that is ``generate_text``).

    PYTHONPATH=. .venv/bin/python benchmarks/serve_load.py --kind calm --clients 8 --requests 20

Not part of the test suite. Keep runs under a few minutes on a shared machine.
"""

from __future__ import annotations

import argparse
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

import openai
import torch

from calm.bench import build_pair
from calm.checkpoint import save_checkpoint
from calm.data.corpus import iter_documents
from calm.data.evalsets import WIKITEXT103_TEST
from calm.data.tokenizer import train_bpe
from calm.generate.completion import TextCompleter
from calm.generate.lm import load_language_model
from calm.io import to_json

PROMPTS = [
    "The history of the city",
    " = Robert Boulter = \n \n Robert Boulter is an English film and television actor .",
    "In 1933 the hurricane",
    "The orchestra",
]


def build_checkpoint(kind: str, out: Path) -> Path:
    """A demo-sized checkpoint with random weights and a 4,096-entry BPE (see the module docstring)."""
    texts = list(iter_documents([WIKITEXT103_TEST], max_words=None))
    tokenizer = train_bpe(texts, vocab_size=4096)
    calm, gpt = build_pair("tiny")
    if tokenizer.vocab_size != calm.config.vocab_size:
        raise SystemExit(f"the BPE has {tokenizer.vocab_size} entries, the tiny preset {calm.config.vocab_size}")
    model = calm if kind == "calm" else gpt
    config = {"kind": kind, "model": asdict(model.config), "tokenizer_sha256": tokenizer.sha256}
    if kind == "calm":
        config["autoencoder"] = asdict(calm.autoencoder.config)
    return save_checkpoint(out / kind, model=model, config=config, tokenizer_json=tokenizer.to_str())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "calm", "serve", "--checkpoint", str(checkpoint), "--port", str(port)]
    cmd += ["--model-name", "m"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=5)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            client.models.list()
            return proc
        except openai.APIConnectionError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not answer within 120 s")


def run_client(url: str, client_id: int, args: argparse.Namespace, records: list[dict]) -> None:
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=600)
    for r in range(args.requests):
        seed, prompt = 1000 * client_id + r, PROMPTS[(client_id + r) % len(PROMPTS)]
        start = time.perf_counter()
        first, text, finish, usage, events = None, [], None, None, 0
        stream = client.completions.create(
            model="m",
            prompt=prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"num_samples": args.num_samples} if args.kind == "calm" else None,
        )
        for event in stream:  # the client stops at "data: [DONE]"
            events += 1
            usage = event.usage or usage
            for choice in event.choices:
                if choice.text:
                    first = first or time.perf_counter()
                    text.append(choice.text)
                finish = choice.finish_reason or finish
        end = time.perf_counter()
        records.append(
            dict(
                client=client_id,
                seed=seed,
                prompt=prompt,
                text="".join(text),
                finish=finish,
                tokens=usage.completion_tokens if usage else None,
                latency=end - start,
                first=(first or end) - start,
                events=events,
                start=start,
                end=end,
            )
        )


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=["calm", "gpt"], default="calm")
    parser.add_argument("--checkpoint", help="serve this checkpoint instead of a random demo-sized one")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else build_checkpoint(args.kind, Path(tmp))
        port = free_port()
        server = start_server(checkpoint, port, args.threads)
        records: list[dict] = []
        try:
            clients = [
                threading.Thread(target=run_client, args=(f"http://127.0.0.1:{port}/v1", c, args, records))
                for c in range(args.clients)
            ]
            wall = time.perf_counter()
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            wall = time.perf_counter() - wall
        finally:
            server.terminate()
            server.wait(timeout=30)

        # Correctness: each streamed text must equal the same completion computed here for its seed.
        completer = TextCompleter(load_language_model(checkpoint))
        wrong = []
        direct = time.perf_counter()
        for rec in records:
            ref = completer.complete(
                rec["prompt"], args.max_tokens, temperature=args.temperature, seed=rec["seed"],
                num_samples=args.num_samples,
            )  # fmt: skip
            if rec["text"] != ref.text or rec["finish"] != ref.finish_reason or rec["tokens"] != ref.completion_tokens:
                wrong.append((rec["seed"], rec["text"][:40], ref.text[:40]))
        direct = time.perf_counter() - direct  # the same completions, one after another, without HTTP

    latencies = [r["latency"] for r in records]
    tokens = sum(r["tokens"] or 0 for r in records)
    expected = args.clients * args.requests
    complete = sum(1 for r in records if r["finish"] in ("stop", "length") and r["tokens"] is not None)
    result = {
        "kind": args.kind,
        "checkpoint": args.checkpoint or "random demo-sized (tiny presets, V = 4,096)",
        "clients": args.clients,
        "requests": expected,
        "responses": len(records),
        "complete": complete,
        "correct": len(records) - len(wrong),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(records) / wall, 2),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p95_s": round(percentile(latencies, 95), 3),
        "first_text_p50_s": round(percentile([r["first"] for r in records], 50), 3),
        "direct_requests_per_s": round(len(records) / direct, 2),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "num_samples": args.num_samples if args.kind == "calm" else None,
        "server_threads": args.threads,
    }
    print(to_json(result, indent=2))
    for seed, got, ref in wrong[:5]:
        print(f"MISMATCH seed {seed}: got {got!r}, expected {ref!r}", file=sys.stderr)
    if complete != expected or wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
