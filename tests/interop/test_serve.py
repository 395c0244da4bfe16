"""The OpenAI-compatible server: real HTTP on a free 127.0.0.1 port, called with the official client.

Each module-scoped server runs uvicorn in a thread of the test process on tiny, barely trained
CALM and GPT checkpoints; the tests compare what the server returns with ``generate_text`` (CALM)
and ``GPT.generate`` (GPT) for the same seed, and check the error cases and the API key.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

for _module in ("fastapi", "uvicorn", "openai", "httpx"):
    pytest.importorskip(_module, reason=f"the server tests need {_module}: pip install -e '.[serve,dev]'")

import httpx  # noqa: E402
import openai  # noqa: E402

from calm.checkpoint import load_model  # noqa: E402
from calm.cli import main  # noqa: E402
from calm.generate.lm import LanguageModelError, as_language_model, generate_text  # noqa: E402
from calm.interop.serve import load_app, serve_in_background  # noqa: E402

PROMPT = "The river crossed"


@pytest.fixture(scope="module")
def calm_model(tiny_lm_checkpoints: dict[str, Path]):
    return load_model(tiny_lm_checkpoints["calm"])


@pytest.fixture(scope="module")
def calm_url(tiny_lm_checkpoints: dict[str, Path]):
    with serve_in_background(load_app(str(tiny_lm_checkpoints["calm"]), model_name="tiny-calm")) as url:
        yield url


@pytest.fixture(scope="module")
def gpt_url(tiny_lm_checkpoints: dict[str, Path]):
    with serve_in_background(load_app(str(tiny_lm_checkpoints["gpt"]), model_name="tiny-gpt")) as url:
        yield url


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


def expected_calm(calm_model, prompt: str, max_tokens: int, seed: int, temperature: float = 1.0, n: int = 16) -> str:
    model, tok, _ = calm_model
    return generate_text(model, tok, [prompt], max_tokens, temperature=temperature, num_samples=n, seed=seed)[0]


def test_models_lists_the_served_model(calm_url: str) -> None:
    models = client(calm_url).models.list()
    assert [m.id for m in models.data] == ["tiny-calm"]


def test_completion_equals_generate_text_for_the_same_seed(calm_url: str, calm_model) -> None:
    for temperature in (1.0, 0.5):
        out = client(calm_url).completions.create(
            model="tiny-calm",
            prompt=PROMPT,
            max_tokens=12,
            temperature=temperature,
            seed=7,
            extra_body={"num_samples": 16, "sampler": "batch"},
        )
        assert out.choices[0].text == expected_calm(calm_model, PROMPT, 12, 7, temperature)
        assert out.object == "text_completion" and out.model == "tiny-calm"
    _, tok, _ = calm_model
    assert out.usage.prompt_tokens == 1 + len(tok.encode(PROMPT))
    finish, used = out.choices[0].finish_reason, out.usage.completion_tokens
    assert (finish == "length" and used == 12) or (finish == "stop" and used < 12), (finish, used)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_usage_says_how_many_calm_steps_fell_back(calm_url: str, gpt_url: str) -> None:
    """One candidate per step (N = 1) can never repeat: every chunk of every choice is plain T = 1 sampling."""
    out = client(calm_url).completions.create(
        model="tiny-calm",
        prompt=PROMPT,
        max_tokens=8,
        n=2,
        temperature=0.5,
        seed=3,
        extra_body={"num_samples": 1},
    )
    sampling = out.usage.model_extra["sampling"]
    assert sampling["sampler"] == "batch" and sampling["temperature"] == 0.5
    assert sampling["steps"] >= 2 and sampling["fallback_steps"] == sampling["steps"]  # >= 1 step per choice
    assert sampling["effective_temperature"] == 1.0
    gpt = client(gpt_url).completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=4, temperature=0.5)
    assert "sampling" not in (gpt.usage.model_extra or {})


def test_chat_messages_are_rendered_by_the_chat_template_then_completed(calm_url: str, calm_model) -> None:
    """Without a fine-tuned template, the default one: a ``role: content`` line per message, then ``assistant:``."""
    messages = [{"role": "user", "content": "Where did the river go"}]
    out = client(calm_url).chat.completions.create(
        model="tiny-calm", messages=messages, max_tokens=8, temperature=0.5, seed=5, extra_body={"num_samples": 16}
    )
    rendered = "user: Where did the river go\nassistant:"
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected_calm(calm_model, rendered, 8, 5, 0.5)
    with pytest.raises(openai.BadRequestError, match="stream=true is not supported"):
        client(calm_url).chat.completions.create(model="tiny-calm", messages=messages, stream=True)


def test_n_and_prompt_lists_number_choices_and_seeds(calm_url: str, calm_model) -> None:
    prompts = [PROMPT, "A small bird"]
    out = client(calm_url).completions.create(model="tiny-calm", prompt=prompts, max_tokens=8, n=2, seed=100)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:  # choice i of the request uses seed + i
        assert c.text == expected_calm(calm_model, prompts[c.index // 2], 8, 100 + c.index, 1.0, n=200)
    alone = client(calm_url).completions.create(model="tiny-calm", prompt=PROMPT, max_tokens=8, seed=101)
    assert alone.choices[0].text == out.choices[1].text  # seed 100 + 1


def test_streaming_sends_the_same_text_chunk_by_chunk(calm_url: str, calm_model) -> None:
    stream = client(calm_url).completions.create(
        model="tiny-calm",
        prompt=PROMPT,
        max_tokens=24,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"num_samples": 16},
    )
    pieces, finish, usage = [], None, None
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            if choice.finish_reason is not None:
                finish = choice.finish_reason
            elif choice.text:
                pieces.append(choice.text)
    text = expected_calm(calm_model, PROMPT, 24, 3)
    assert "".join(pieces) == text
    assert finish in ("stop", "length") and usage is not None
    if usage.completion_tokens > 8:  # more than two chunks of K = 4 decoded: more than one event
        assert len(pieces) >= 2


def test_stop_strings_cut_the_text_in_plain_and_streaming_mode(calm_url: str, calm_model) -> None:
    full = expected_calm(calm_model, PROMPT, 24, 5)
    assert len(full) >= 6, f"the tiny model's completion is too short to test stop strings: {full!r}"
    stop = full[3:5]
    cut = full[: full.index(stop)]
    c = client(calm_url)
    args = dict(model="tiny-calm", prompt=PROMPT, max_tokens=24, seed=5, stop=[stop, "never appears"])
    out = c.completions.create(**args)
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed = "".join(ch.text for ev in c.completions.create(**args, stream=True) for ch in ev.choices)
    assert streamed == cut


def test_concurrent_requests_queue_and_never_mix(calm_url: str, calm_model) -> None:
    results: dict[int, str] = {}

    def ask(seed: int) -> None:
        out = client(calm_url).completions.create(model="tiny-calm", prompt=PROMPT, max_tokens=16, seed=seed)
        results[seed] = out.choices[0].text

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {seed: expected_calm(calm_model, PROMPT, 16, seed, n=200) for seed in range(6)}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"temperature": 1.5}, "temperature", "(0, 1]"),
        ({"temperature": 0}, "temperature", "(0, 1]"),
        ({"max_tokens": 60}, "max_tokens", "context"),
        ({"prompt": "word " * 80}, "prompt", "context"),
        ({"n": 17}, "n", "at most 16"),
        ({"max_tokens": "ten"}, "max_tokens", "integer"),
        ({"temperature": "0.5"}, "temperature", "number"),
        ({"prompt": 3}, "prompt", "string"),
        ({"num_samples": 0}, "num_samples", "greater than or equal to 1"),
        ({"sampler": "greedy"}, "sampler", "batch"),
        ({"stream": "yes"}, "stream", "boolean"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"logprobs": 2}, "logprobs", "not supported"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ],
)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(
    calm_url: str, body: dict, param: str, words: str
) -> None:
    request = {"model": "tiny-calm", "prompt": PROMPT, "max_tokens": 4, **body}
    r = httpx.post(f"{calm_url}/v1/completions", json=request, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"], error["message"]
    ok = httpx.post(f"{calm_url}/v1/completions", json={"model": "tiny-calm", "prompt": "x", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_official_client_raises_on_errors(calm_url: str) -> None:
    c = client(calm_url)
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model="tiny-calm", prompt=PROMPT, temperature=2.0)
    assert "temperature" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt=PROMPT)
    for raw in (b"{not json", b"[1, 2]"):
        r = httpx.post(f"{calm_url}/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()


def test_gpt_is_served_the_same_way(gpt_url: str, tiny_lm_checkpoints: dict[str, Path]) -> None:
    model, tok, _ = load_model(tiny_lm_checkpoints["gpt"])
    c = client(gpt_url)
    for temperature in (0.0, 0.8):
        expected = generate_text(model, tok, [PROMPT], 10, temperature=temperature, seed=11)[0]
        args = dict(model="tiny-gpt", prompt=PROMPT, max_tokens=10, temperature=temperature, seed=11)
        assert c.completions.create(**args).choices[0].text == expected
        streamed = [ch.text for ev in c.completions.create(**args, stream=True) for ch in ev.choices if ch.text]
        assert "".join(streamed) == expected
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny-gpt", prompt=PROMPT, temperature=2.5)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model="tiny-gpt", prompt=PROMPT, max_tokens=40)


def test_gpt_greedy_completion_equals_the_cli_and_generate_text(gpt_url, tiny_lm_checkpoints, capsys) -> None:
    """One request, three entry points: the server, ``calm generate`` and ``generate_text`` at T = 0."""
    model, tok, _ = load_model(tiny_lm_checkpoints["gpt"])
    expected = generate_text(model, tok, ["The city"], 16, temperature=0)[0]
    served = client(gpt_url).completions.create(model="tiny-gpt", prompt="The city", max_tokens=16, temperature=0)
    assert served.choices[0].text == expected
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(tiny_lm_checkpoints["gpt"]), "--prompt", "The city"]
    assert main([*argv, "--max-new-tokens", "16", "--temperature", "0", "--quiet"]) == 0
    assert capsys.readouterr().out == "The city" + expected + "\n"


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_calm_refusals_carry_the_python_message(calm_url: str, calm_model, temperature: float) -> None:
    model, tok, _ = calm_model
    with pytest.raises(LanguageModelError) as info:
        generate_text(model, tok, [PROMPT], 4, temperature=temperature)
    request = {"model": "tiny-calm", "prompt": PROMPT, "max_tokens": 4, "temperature": temperature}
    r = httpx.post(f"{calm_url}/v1/completions", json=request, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == str(info.value) and r.json()["error"]["param"] == "temperature"


def test_api_key_is_required_when_set(tiny_lm_checkpoints: dict[str, Path]) -> None:
    app = load_app(str(tiny_lm_checkpoints["calm"]), model_name="m", api_key="s3cret")
    with serve_in_background(app) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client(url, "s3cret").completions.create(model="m", prompt="x", max_tokens=4).choices


def test_cli_refuses_a_missing_or_wrong_checkpoint(tmp_path: Path, capsys, tiny_lm_checkpoints) -> None:
    assert main(["serve", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tiny_lm_checkpoints["ae"])]) == 2
    assert "CALM or GPT" in capsys.readouterr().err


def test_events_are_server_sent_events(calm_url: str) -> None:
    body = {"model": "tiny-calm", "prompt": PROMPT, "max_tokens": 8, "stream": True, "seed": 1}
    with httpx.stream("POST", f"{calm_url}/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_scanner_holds_back_a_stop_string_split_across_pieces() -> None:
    from calm.generate.completion import StopScanner

    sent: list[str] = []
    scanner = StopScanner(["<end>", "xyz"], sent.append)
    assert not scanner.feed("hello <e")
    assert "".join(sent) == "hell"  # the last 4 characters ("o <e") could begin "<end>": held back
    assert not scanner.feed("n")
    assert scanner.feed("d> after")
    assert scanner.finish() == "hello " and "".join(sent) == "hello "
    plain: list[str] = []
    scanner = StopScanner([], plain.append)
    for piece in ("a", "b<", "end>"):
        assert not scanner.feed(piece)
    assert plain == ["a", "b<", "end>"] and scanner.finish() == "ab<end>"


def test_a_cancelled_completion_stops_at_the_next_chunk(calm_model) -> None:
    """What the server does when a streaming client goes away: the worker stops, freeing the queue."""
    from calm.generate.completion import TextCompleter

    model, tok, _ = calm_model
    completer = TextCompleter(as_language_model(model, tok))
    full = completer.complete(PROMPT, 40, seed=2)
    assert full.finish_reason == "length" and full.completion_tokens == 40
    cancelled = threading.Event()
    pieces: list[str] = []
    cut = completer.complete(
        PROMPT, 40, seed=2, emit=lambda t: (pieces.append(t), cancelled.set()), cancelled=cancelled
    )
    assert cut.finish_reason == "stop" and len(pieces) == 1  # nothing after the chunk that set the flag
    assert cut.text == pieces[0] and full.text.startswith(cut.text) and len(cut.text) < len(full.text)
