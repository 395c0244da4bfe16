"""The language-model interface: the kind is decided in one place and each rule is written once.

Tiny untrained models (``factories.tiny_calm``, ``factories.tiny_gpt``) and the tiny tokenizer: the tests
check which requests each kind accepts, with which message it refuses the rest, that the room the
interface reports is exactly what the decoding loop accepts, and that the GPT decodes greedily at
T = 0 and samples above T = 1.
"""

from __future__ import annotations

import factories
import pytest
import torch
from torch import nn

from calm.generate.engine import generate_rows
from calm.generate.lm import (
    CALMLanguageModel,
    LanguageModelError,
    TokenLanguageModel,
    as_language_model,
    complete,
    generate_text,
)

K = 4


@pytest.fixture(scope="module")
def calm_lm(tiny_tokenizer) -> CALMLanguageModel:
    return as_language_model(factories.tiny_calm(vocab=tiny_tokenizer.vocab_size, K=K).eval(), tiny_tokenizer)


@pytest.fixture(scope="module")
def gpt_lm(tiny_tokenizer) -> TokenLanguageModel:
    return as_language_model(factories.tiny_gpt(vocab=tiny_tokenizer.vocab_size, max_seq_len=48).eval(), tiny_tokenizer)


def test_the_kind_is_decided_by_the_model(calm_lm, gpt_lm) -> None:
    assert isinstance(calm_lm, CALMLanguageModel) and calm_lm.kind == "calm" and not calm_lm.has_likelihood
    assert isinstance(gpt_lm, TokenLanguageModel) and gpt_lm.kind == "gpt" and gpt_lm.has_likelihood
    assert (calm_lm.tokens_per_step, gpt_lm.tokens_per_step) == (K, 1)
    assert calm_lm.context_tokens == calm_lm.model.config.max_seq_len * K
    assert gpt_lm.context_tokens == 48
    assert (calm_lm.greedy_temperature, gpt_lm.greedy_temperature) == (0.01, 0.0)


def test_an_autoencoder_or_another_module_is_refused_with_a_clear_message(tiny_tokenizer) -> None:
    ae = factories.tiny_autoencoder(seed=None, hidden_size=16, intermediate_size=16, latent_size=4)
    with pytest.raises(LanguageModelError, match=r"runs/ae is an autoencoder; pass a CALM or GPT checkpoint") as info:
        as_language_model(ae, tiny_tokenizer, name="runs/ae")
    assert "calm eval-ae" in str(info.value) and info.value.param == "model"
    with pytest.raises(ValueError, match=r"this Linear is a Linear, not a CALM or GPT model"):
        as_language_model(nn.Linear(2, 2), tiny_tokenizer)


@pytest.mark.parametrize("temperature", [0.0, 1.5, -0.5, float("nan")])
def test_calm_refuses_temperatures_outside_0_1_with_one_message(calm_lm, temperature) -> None:
    with pytest.raises(LanguageModelError) as info:
        calm_lm.check_request(2, 4, temperature=temperature)
    assert info.value.param == "temperature"
    assert str(info.value).startswith(f"temperature must be in (0, 1] for CALM, got {temperature}: ")
    assert "only sharpen" in str(info.value) and "0.01" in str(info.value)  # why, and what to ask for instead
    with pytest.raises(LanguageModelError) as again:
        complete(calm_lm.model, calm_lm.tokenizer, ["The river"], 4, temperature=temperature)
    assert str(again.value) == str(info.value)  # the text API gives the same message


def test_calm_accepts_temperatures_in_0_1(calm_lm) -> None:
    for temperature in (1e-3, 0.5, 1.0):
        calm_lm.check_request(2, 4, temperature=temperature, num_samples=1, sampler="exact")


def test_the_gpt_accepts_0_to_2_and_refuses_the_rest(gpt_lm) -> None:
    for temperature in (0.0, 0.7, 1.5, 2.0):
        gpt_lm.check_request(2, 4, temperature=temperature)
    for temperature in (-0.1, 2.5):
        with pytest.raises(LanguageModelError, match=r"temperature must be in \[0, 2\] for the GPT, .*0 = greedy"):
            gpt_lm.check_request(2, 4, temperature=temperature)


@pytest.mark.parametrize("kind", ["calm", "gpt"])
def test_request_rules_are_shared(kind, calm_lm, gpt_lm) -> None:
    lm = calm_lm if kind == "calm" else gpt_lm
    cases = [
        (dict(num_samples=0), "num_samples", r"num_samples must be >= 1, got 0"),
        (dict(sampler="greedy"), "sampler", r"sampler must be 'batch' or 'exact', got 'greedy'"),
    ]
    for kwargs, param, message in cases:
        with pytest.raises(LanguageModelError, match=message) as info:
            lm.check_request(2, 4, temperature=1.0, **kwargs)
        assert info.value.param == param
    with pytest.raises(LanguageModelError, match="max_new_tokens must be >= 1, got 0"):
        lm.check_request(2, 0)


def test_calm_room_is_exactly_what_the_decoding_loop_accepts(calm_lm) -> None:
    """For every prompt length n, ``max_new_tokens(n)`` new tokens pass the interface's check and one more
    is refused by it and by the decoding loop's own guard; the loop runs the largest request in full."""
    context = calm_lm.context_steps

    def loop(n: int, new: int) -> list[list[int]]:
        prompt = torch.zeros(1, -(-n // K) * K, dtype=torch.long)  # BOS-padded to whole chunks
        return generate_rows(calm_lm.model, prompt, new, temperature=1.0, num_samples=1, sampler="batch",
                             stop_ids=frozenset(), generator=torch.Generator().manual_seed(0), use_cache=True,
                             on_chunk=None)[0]  # fmt: skip

    for n in range(1, context * K + 2):
        room = calm_lm.max_new_tokens(n)
        if room >= 1:
            calm_lm.check_request(n, room)
        with pytest.raises(LanguageModelError, match=f"exceeds the context of {context} steps of {K} tokens"):
            calm_lm.check_request(n, max(room, 0) + 1)
        with pytest.raises(ValueError, match="exceeds the context"):
            loop(n, max(room, 0) + 1)
    for n in (1, K, K + 1, context * K):
        assert len(loop(n, calm_lm.max_new_tokens(n))[0]) == calm_lm.max_new_tokens(n)


def test_gpt_room_and_the_prompt_param(gpt_lm) -> None:
    assert gpt_lm.max_new_tokens(10) == 38
    gpt_lm.check_request(10, 38)
    with pytest.raises(LanguageModelError, match="exceeds the context of 48 tokens: there is room for at most 38") as e:
        gpt_lm.check_request(10, 39)
    assert e.value.param == "max_new_tokens"
    with pytest.raises(LanguageModelError, match="room for at most 0 new tokens") as e:
        gpt_lm.check_request(60, 1)
    assert e.value.param == "prompt"


def test_prompt_encoding_and_document_ends(calm_lm) -> None:
    tok = calm_lm.tokenizer
    assert calm_lm.encode_prompt("The river") == [tok.bos_id] + tok.encode("The river")
    assert calm_lm.stop_ids() == {tok.bos_id, tok.eos_id} and calm_lm.stop_ids(False) == frozenset()
    words = tok.encode(" the river")
    assert calm_lm.decode_text([tok.bos_id, *words, tok.eos_id, tok.pad_id]) == tok.decode(words)


def test_the_gpt_is_greedy_at_0_and_samples_above_1(gpt_lm) -> None:
    model, tok = gpt_lm.model, gpt_lm.tokenizer
    greedy = [complete(model, tok, ["The river"], 12, temperature=0.0, seed=s)[0] for s in range(3)]
    assert len({g.text for g in greedy}) == 1  # no draws at T = 0
    ids = gpt_lm.encode_prompt("The river")
    argmax = model.generate(torch.tensor([ids]), 12, temperature=0.0)[0, len(ids) :].tolist()
    stop = next((i for i, t in enumerate(argmax) if t in gpt_lm.stop_ids()), len(argmax))
    assert greedy[0].token_ids == argmax[:stop]
    hot = [generate_text(model, tok, ["The river"], 12, temperature=1.5, seed=s)[0] for s in range(3)]
    assert hot == [generate_text(model, tok, ["The river"], 12, temperature=1.5, seed=s)[0] for s in range(3)]
    assert any(text != greedy[0].text for text in hot)  # an untrained model at T = 1.5 is far from its argmax


def test_calm_greedy_temperature_is_checked(calm_lm) -> None:
    assert as_language_model(calm_lm.model, calm_lm.tokenizer, greedy_temperature=0.2).greedy_temperature == 0.2
    with pytest.raises(LanguageModelError, match=r"\(0, 1\] for CALM, got 0"):
        as_language_model(calm_lm.model, calm_lm.tokenizer, greedy_temperature=0.0)


def test_head_steps_apply_to_calm_only(gpt_lm, calm_lm) -> None:
    with pytest.raises(LanguageModelError, match="head_steps applies to CALM checkpoints .* not gpt"):
        gpt_lm.set_head_steps(4)
    with pytest.raises(ValueError, match="sampling steps apply to flow and diffusion heads"):
        calm_lm.set_head_steps(4)  # the energy head draws in one pass


def test_a_single_string_is_one_prompt(gpt_lm) -> None:
    from calm.generate.lm import generate_text

    one = generate_text(gpt_lm.model, gpt_lm.tokenizer, "hello", 4, temperature=0.0)
    assert one == generate_text(gpt_lm.model, gpt_lm.tokenizer, ["hello"], 4, temperature=0.0)
    assert len(one) == 1  # not one completion per character


def test_calm_completions_say_how_many_steps_fell_back_to_t_1(calm_lm, gpt_lm) -> None:
    """With one candidate (N = 1) Alg. 2 can never find a repeat, so every step is plain T = 1 sampling and
    says so; the exact sampler samples every step at T; the GPT's softmax temperature needs no report."""
    prompts = ["The city", "A river"]
    kw = dict(temperature=0.5, seed=0, stop_at_document_end=False)
    for completion in calm_lm.complete(prompts, 16, num_samples=1, **kw):
        s = completion.sampling
        assert (s.steps, s.fallback_steps, s.effective_temperature, s.sampler) == (4, 4, 1.0, "batch")
    (exact,) = calm_lm.complete(prompts[:1], 8, sampler="exact", **kw)
    assert (exact.sampling.steps, exact.sampling.fallback_steps, exact.sampling.effective_temperature) == (2, 0, 0.5)
    (plain,) = calm_lm.complete(prompts[:1], 8, temperature=1.0, seed=0)
    assert plain.sampling.fallback_steps == 0 and plain.sampling.effective_temperature == 1.0
    assert gpt_lm.complete(prompts[:1], 4, temperature=0.5, seed=0)[0].sampling is None


def test_stats_are_kept_when_a_stream_stops_generation(calm_lm) -> None:
    class Stop(Exception):
        pass

    def stop_at_once(text: str) -> None:
        raise Stop

    stats: list = []
    with pytest.raises(Stop):
        calm_lm.complete(
            ["The city"],
            16,
            temperature=0.5,
            num_samples=1,
            seed=0,
            stream=stop_at_once,
            stats=stats,
            stop_at_document_end=False,
        )
    (s,) = stats
    assert s.steps >= 1 and s.fallback_steps == s.steps
