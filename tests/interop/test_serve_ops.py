"""``calm serve`` operations: /health, Prometheus /metrics, a bounded queue (503 + Retry-After), the
per-request timeout, and a client that leaves mid-stream stopping its generation."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

for _module in ("fastapi", "uvicorn", "httpx", "prometheus_client"):
    pytest.importorskip(_module, reason=f"the server tests need {_module}: pip install -e '.[serve,dev]'")

import httpx  # noqa: E402

from calm.interop.serve import load_app, serve_in_background  # noqa: E402

BODY = {"model": "m", "prompt": "The river crossed", "temperature": 0.5, "seed": 0}


def _app(checkpoint: Path, **settings):
    return load_app(str(checkpoint), model_name="m", **settings)


def test_health_and_metrics(tiny_lm_checkpoints) -> None:
    app = _app(tiny_lm_checkpoints["calm"])
    with serve_in_background(app) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": "m", "queue": 0, "running": 0}
        out = httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 8, "extra": 1}, timeout=60)
        assert out.status_code == 400  # unknown field: counted too
        out = httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 8}, timeout=60).json()
        text = httpx.get(f"{url}/metrics").text
    assert 'calm_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'calm_requests_total{endpoint="/v1/completions",status="400"} 1.0' in text
    assert f"calm_completion_tokens_total {float(out['usage']['completion_tokens'])}" in text
    assert "calm_time_to_first_token_seconds_count 1.0" in text and "calm_queue_length 0.0" in text


def test_a_flood_beyond_the_queue_gets_503_and_the_admitted_requests_complete(tiny_lm_checkpoints) -> None:
    app = _app(tiny_lm_checkpoints["calm"], max_queue=2)
    answers: list[httpx.Response] = []
    with serve_in_background(app) as url:
        body = {**BODY, "max_tokens": 48, "extra_body": None}
        body.pop("extra_body")

        def send() -> None:
            answers.append(httpx.post(f"{url}/v1/completions", json={**body, "num_samples": 200}, timeout=120))

        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 4}, timeout=60)
    codes = sorted(a.status_code for a in answers)
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    for a in answers:
        if a.status_code == 503:
            assert a.headers["retry-after"] == "1" and a.json()["error"]["code"] == "queue_full"
        else:
            assert a.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert after.status_code == 200
    assert app.state.service.admission.rejected == codes.count(503)


def test_a_request_over_the_timeout_gets_504_and_its_work_stops(tiny_lm_checkpoints) -> None:
    app = _app(tiny_lm_checkpoints["calm"], request_timeout=0.2)
    with serve_in_background(app) as url:
        body = {**BODY, "max_tokens": 40, "n": 16, "num_samples": 200}
        start = time.perf_counter()
        slow = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        elapsed = time.perf_counter() - start
        quick = httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 4, "temperature": 1.0}, timeout=60)
    assert slow.status_code == 504 and "took longer than 0.2 s" in slow.json()["error"]["message"]
    assert elapsed < 10  # stopped at the next chunk, not after 16 choices of 40 tokens
    assert quick.status_code == 200
    assert app.state.service.admission.cancelled == 1


def test_a_client_that_leaves_mid_stream_stops_its_generation(tiny_lm_checkpoints) -> None:
    app = _app(tiny_lm_checkpoints["calm"])
    service = app.state.service

    def steps() -> float:  # backbone steps run so far
        return next(s.value for s in service.metrics.step_batch_size.collect()[0].samples if s.name.endswith("_count"))

    with serve_in_background(app) as url:
        body = {**BODY, "max_tokens": 40, "n": 16, "num_samples": 200, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # one event, then the client goes away
        left = steps()
        deadline = time.monotonic() + 30
        while (service.admission.cancelled == 0 or service.batcher.active) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert service.admission.cancelled == 1 and service.admission.finished == 0
    assert service.batcher.active == 0  # its 16 rows left the batch
    assert steps() <= left + 2 < 10  # 40 tokens are 10 steps of K = 4: the work stopped soon after the client left


def test_sigterm_lets_the_open_request_finish_and_says_so(tiny_lm_checkpoints) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "calm", "serve", "--checkpoint", str(tiny_lm_checkpoints["calm"]), "--port",
           str(port), "--model-name", "m"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        answers: list[httpx.Response] = []
        body = {**BODY, "max_tokens": 40, "n": 16, "num_samples": 200}
        sender = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{url}/v1/completions", json=body, timeout=120))
        )
        sender.start()
        while httpx.get(f"{url}/health", timeout=5).json()["running"] == 0:
            time.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        sender.join()
        _, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert answers[0].status_code == 200 and len(answers[0].json()["choices"]) == 16
    assert server.returncode in (0, -int(signal.SIGTERM))  # uvicorn re-raises the signal once it has shut down
    assert "calm serve stopped: 1 requests finished, 0 cancelled" in err


CALM_MIX = [  # concurrent requests: temperature, sampler, N, n, seed, streamed
    {"temperature": 1.0, "n": 2, "seed": 10},
    {"temperature": 0.5, "num_samples": 16, "seed": 20, "stream": True},
    {"temperature": 0.5, "sampler": "exact", "seed": 30, "max_tokens": 8},
    {"temperature": 0.6, "sampler": "exact", "seed": 40, "max_tokens": 8, "stream": True},
    {"temperature": 0.25, "num_samples": 64, "n": 3, "seed": 50},
    {"temperature": 1.0, "seed": 60, "prompt": "A", "stream": True},
]
GPT_MIX = [
    {"temperature": 0.0, "seed": 1},
    {"temperature": 1.0, "n": 3, "seed": 2, "stream": True},
    {"temperature": 0.7, "seed": 3, "prompt": "A"},
    {"temperature": 1.5, "n": 2, "seed": 4, "stream": True},
]


def _texts(url: str, body: dict) -> list[str]:
    """The choices' texts of one request, streamed or not."""
    if not body.get("stream"):
        out = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert out.status_code == 200, out.text
        return [c["text"] for c in out.json()["choices"]]
    texts: dict[int, str] = {}
    finished = set()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                    if c["finish_reason"]:
                        finished.add(c["index"])
    assert finished == set(range(body.get("n", 1)))  # every choice finished
    return [texts[i] for i in range(len(texts))]


@pytest.mark.parametrize("kind", ["calm", "gpt"])
def test_concurrent_mixed_requests_each_equal_their_single_request_result(tiny_lm_checkpoints, kind) -> None:
    """Requests of mixed temperatures, samplers, n and seeds, sent at once, share the batch; each choice's text
    equals ``generate_text`` on its prompt alone with seed + index."""
    from calm.checkpoint import load_model
    from calm.generate.lm import generate_text

    app = _app(tiny_lm_checkpoints[kind])
    mix = CALM_MIX if kind == "calm" else GPT_MIX
    bodies = [
        {"model": "m", "prompt": "The river crossed", "max_tokens": 16 if kind == "calm" else 8, **m} for m in mix
    ]
    got: dict[int, list[str]] = {}
    start = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        start.wait()
        got[i] = _texts(url, bodies[i])

    with serve_in_background(app) as url:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        metrics = httpx.get(f"{url}/metrics").text
    model, tok, _ = load_model(tiny_lm_checkpoints[kind])
    for i, body in enumerate(bodies):
        want = [
            generate_text(
                model, tok, [body["prompt"]], body["max_tokens"], temperature=body["temperature"],
                seed=body["seed"] + c, num_samples=body.get("num_samples", 200), sampler=body.get("sampler", "batch"),
            )[0]
            for c in range(body.get("n", 1))
        ]  # fmt: skip
        assert got[i] == want, body
    sizes = [line for line in metrics.splitlines() if line.startswith("calm_step_batch_size_bucket")]
    singles = float(next(line for line in sizes if 'le="1.0"' in line).split()[-1])
    total = float(
        next(line for line in metrics.splitlines() if line.startswith("calm_step_batch_size_count")).split()[-1]
    )
    assert total > singles  # some backbone steps ran several requests together
