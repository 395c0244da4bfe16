"""The lm-evaluation-harness model: requests as lm-eval's own Instance objects, and a real
``lm_eval`` command-line run on local task files (no hub) for tiny CALM and GPT checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="the lm-eval tests need lm-eval: pip install -e '.[dev]' (or '.[lm-eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from calm.generate.lm import LanguageModelError, generate_text  # noqa: E402
from calm.interop.lm_eval import CALMLM, CALMHasNoLikelihood, main  # noqa: E402

QA = [
    {"question": "Who wrote to the orchestra", "answer": "Du Fu"},
    {"question": "What did the river cross", "answer": "the old bridge"},
    {"question": "When was the hurricane", "answer": "1933"},
    {"question": "Who sang about a quiet valley", "answer": "A small bird"},
    {"question": "What did Robert Boulter describe", "answer": "its audience"},
    {"question": "Where is the café", "answer": "naïve"},
]


def instance(kind: str, args: tuple, idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


@pytest.fixture(scope="module")
def calm_lm(tiny_lm_checkpoints: dict[str, Path]) -> CALMLM:
    return CALMLM(pretrained=str(tiny_lm_checkpoints["calm"]), num_samples=16)


@pytest.fixture(scope="module")
def gpt_lm(tiny_lm_checkpoints: dict[str, Path]) -> CALMLM:
    return CALMLM(pretrained=str(tiny_lm_checkpoints["gpt"]), batch_size=3)


def test_calm_generate_until_is_generate_text_cut_at_the_stop(calm_lm: CALMLM) -> None:
    model, tok = calm_lm.language_model.model, calm_lm.language_model.tokenizer
    requests = [
        instance("generate_until", ("Q: When was the hurricane\nA:", {"until": ["\n"], "max_gen_toks": 8}), 0),
        instance("generate_until", ("The river", {"until": ["e"], "do_sample": True, "temperature": 1.0}), 1),
    ]
    out = calm_lm.generate_until(requests, disable_tqdm=True)
    # request i uses seed 0 + i; greedy requests use greedy_temperature (0.01), with num_samples = 16
    full = generate_text(model, tok, ["Q: When was the hurricane\nA:"], 8, temperature=0.01, num_samples=16, seed=0)
    assert out[0] == full[0].split("\n")[0]
    max_new = calm_lm.language_model.context_tokens // 2  # the default 256 is capped at half the context
    full = generate_text(model, tok, ["The river"], max_new, temperature=1.0, seed=1)
    assert out[1] == full[0].split("e")[0]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        calm_lm.generate_until([instance("generate_until", ("x", {"do_sample": True, "temperature": 1.5}))])


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_calm_refuses_sampling_outside_0_1_with_the_python_message(calm_lm: CALMLM, temperature: float) -> None:
    """``do_sample=True`` asks for sampling at the given temperature; CALM refuses 0 and 1.5 as Python does."""
    model, tok = calm_lm.language_model.model, calm_lm.language_model.tokenizer
    with pytest.raises(LanguageModelError) as python:
        generate_text(model, tok, ["x"], 4, temperature=temperature)
    request = instance("generate_until", ("x", {"do_sample": True, "temperature": temperature}))
    with pytest.raises(LanguageModelError) as info:
        calm_lm.generate_until([request], disable_tqdm=True)
    assert str(info.value) == str(python.value)


def test_gpt_greedy_requests_are_argmax_and_hot_ones_sample(gpt_lm: CALMLM) -> None:
    model, tok = gpt_lm.language_model.model, gpt_lm.language_model.tokenizer
    requests = [
        instance("generate_until", ("The city", {"until": ["\n"], "max_gen_toks": 8}), 0),
        instance("generate_until", ("The city", {"until": ["\n"], "max_gen_toks": 8, "temperature": 1.5}), 1),
    ]
    out = gpt_lm.generate_until(requests, disable_tqdm=True)
    assert out[0] == generate_text(model, tok, ["The city"], 8, temperature=0)[0].split("\n")[0]
    assert out[1] == generate_text(model, tok, ["The city"], 8, temperature=1.5, seed=1)[0].split("\n")[0]


def test_unknown_model_args_are_refused(tiny_lm_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(TypeError, match="num_sample"):
        CALMLM.create_from_arg_string(f"pretrained={tiny_lm_checkpoints['calm']},num_sample=8")
    with pytest.raises(ValueError, match="sampler"):
        CALMLM(pretrained=str(tiny_lm_checkpoints["calm"]), sampler="greedy")


def test_calm_refuses_likelihoods_and_names_generative_tasks(calm_lm: CALMLM) -> None:
    with pytest.raises(CALMHasNoLikelihood, match="gsm8k") as info:
        calm_lm.loglikelihood([instance("loglikelihood", ("Q:", " A"))])
    assert "calm eval" in str(info.value) and "generate_until" in str(info.value)
    with pytest.raises(CALMHasNoLikelihood, match="loglikelihood_rolling"):
        calm_lm.loglikelihood_rolling([instance("loglikelihood_rolling", ("some text",))])


def test_gpt_loglikelihood_matches_a_direct_softmax(gpt_lm: CALMLM) -> None:
    model, tok = gpt_lm.language_model.model, gpt_lm.language_model.tokenizer
    pairs = [("The river crossed", " the old bridge"), ("A small bird ", "sang"), ("", "Du Fu"), ("x", " in 1933 .")]
    got = gpt_lm.loglikelihood([instance("loglikelihood", p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (score, greedy) in zip(pairs, got):
        context_ids = [tok.bos_id] + tok.encode(context.rstrip())
        whole = [tok.bos_id] + tok.encode(context.rstrip() + context[len(context.rstrip()) :] + continuation)
        cont = whole[len(context_ids) :]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([whole[:-1]])).float(), -1)[0]
        rows = logp[len(context_ids) - 1 :]
        assert score == pytest.approx(rows.gather(1, torch.tensor(cont)[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
        assert score < 0


def test_gpt_rolling_loglikelihood_covers_every_token_once(gpt_lm: CALMLM) -> None:
    model, tok = gpt_lm.language_model.model, gpt_lm.language_model.tokenizer
    short = "The orchestra followed a quiet valley ."
    long = " ".join(["The 1933 hurricane destroyed the old bridge in 1850 ."] * 6)  # longer than 32 tokens
    assert len(tok.encode(long)) > model.config.max_seq_len
    got = gpt_lm.loglikelihood_rolling([instance("loglikelihood_rolling", (t,)) for t in (short, long)])
    ids = [tok.bos_id] + tok.encode(short)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]
    assert got[0] == pytest.approx(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item(), abs=1e-4)
    # Disjoint windows: every token of the long text is scored once, each at a cost > 0 nats.
    per_token = -got[1] / len(tok.encode(long))
    assert 0 < per_token < 2 * torch.log(torch.tensor(float(tok.vocab_size))).item()


def write_tasks(root: Path) -> Path:
    """Two local tasks: a generative QA task and a multiple-choice one, on a local jsonl file."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in QA), encoding="utf-8")
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "calm_tiny_qa.yaml").write_text(
        "task: calm_tiny_qa\n" + common + "output_type: generate_until\n"
        'doc_to_text: "Q: {{question}}\\nA:"\n'
        'doc_to_target: " {{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    (root / "calm_tiny_mc.yaml").write_text(
        "task: calm_tiny_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}\\nA:"\n'
        'doc_to_choice: ["Du Fu", "the old bridge", "1933"]\n'
        "doc_to_target: 0\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["calm", "gpt"])
def test_lm_eval_command_line_on_a_local_task(
    kind: str, tiny_lm_checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    tasks = write_tasks(tmp_path / "tasks")
    names = "calm_tiny_qa" if kind == "calm" else "calm_tiny_qa,calm_tiny_mc"
    out = tmp_path / "results"
    argv = ["--model", "calm", "--model_args", f"pretrained={tiny_lm_checkpoints[kind]},num_samples=16"]
    argv += ["--tasks", names, "--include_path", str(tasks), "--limit", "4", "--output_path", str(out)]
    main([*argv, "--log_samples"])
    files = sorted(out.rglob("results_*.json"))
    assert files, f"lm_eval wrote no results under {out}: {os.listdir(out) if out.exists() else 'nothing'}"
    results = json.loads(files[-1].read_text())["results"]
    assert 0.0 <= results["calm_tiny_qa"]["exact_match,none"] <= 1.0
    samples = [json.loads(line) for f in out.rglob("samples_calm_tiny_qa_*.jsonl") for line in f.open()]
    assert len(samples) == 4 and all(isinstance(s["resps"][0][0], str) for s in samples)
    if kind == "gpt":
        assert 0.0 <= results["calm_tiny_mc"]["acc,none"] <= 1.0
