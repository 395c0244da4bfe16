"""``calm finetune``: reading examples, the chunk-aligned encoding, the answer-only loss, and bad inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import factories
import pytest
import torch

from calm.cli import main
from calm.data.instruct import Example, ExampleError, Fields, encode_example, read_examples
from calm.train.finetune import answer_loss


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_pairs_and_chats_are_read_and_rendered(tmp_path) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "2 + 2 =", "completion": " 4"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"q": "capital of France?", "a": " Paris"},
        ],
    )
    with pytest.raises(ExampleError, match=r"d.jsonl:3 has no 'prompt'/'completion' pair"):
        read_examples(path)  # one file, one format per line: line 3 names other fields
    path = _jsonl(tmp_path / "e.jsonl", [{"q": "capital of France?", "a": " Paris"}])
    (ex,) = read_examples(path, Fields(prompt="q", completion="a"), prompt_template="Q: {{ prompt }}\nA:")
    assert ex == Example("Q: capital of France?\nA:", " Paris")
    path = _jsonl(tmp_path / "f.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "hello"}]}])  # fmt: skip
    assert read_examples(path) == [Example("user: hi\nassistant:", "hello")]


@pytest.mark.parametrize(
    ("row", "kw", "message"),
    [
        ({"question": "x", "answer": "y"}, {}, r"bad.jsonl:1 has no 'prompt'/'completion' pair .* --prompt-field"),
        ({"prompt": "x", "completion": "  "}, {}, r"bad.jsonl:1 has an empty answer"),
        ("{not json", {}, r"bad.jsonl:1 is not JSON"),
        (
            {"prompt": "x", "completion": "y"},
            {"prompt_template": "{{ question }}"},
            r"prompt template .* does not render",
        ),
        ({"prompt": "x", "completion": "y"}, {"prompt_template": "{% if %}"}, r"prompt template does not parse"),
        ({"messages": [{"role": "user", "content": "hi"}]}, {}, r"last message must be the assistant's answer"),
    ],
)
def test_bad_example_files_name_the_line_and_the_fix(tmp_path, row, kw, message) -> None:
    with pytest.raises(ExampleError, match=message):
        read_examples(_jsonl(tmp_path / "bad.jsonl", [row]), **kw)


@pytest.mark.parametrize("prompt", ["a", "The river", "The river crossed the old bridge in 1901"])
def test_calm_answers_start_on_a_chunk_boundary(tiny_tokenizer, prompt) -> None:
    """The prompt is left-padded with BOS as generation pads it; the answer ends with EOS, then PAD to K."""
    tok, K = tiny_tokenizer, 4
    e = encode_example(tok, Example(prompt, " the orchestra"), K)
    answer = tok.encode(" the orchestra")
    assert len(e.ids) % K == 0 and e.prompt_tokens % K == 0
    left = e.prompt_tokens - 1 - len(tok.encode(prompt))
    assert e.ids[: left + 1] == [tok.bos_id] * (left + 1) and left < K
    assert e.ids[e.prompt_tokens : e.prompt_tokens + len(answer) + 1] == [*answer, tok.eos_id]
    assert set(e.ids[e.prompt_tokens + len(answer) + 1 :]) <= {tok.pad_id}
    assert e.target == [0] * e.prompt_tokens + [1] * (len(e.ids) - e.prompt_tokens)
    assert e.padding == left + len(e.ids) - e.prompt_tokens - len(answer) - 1
    gpt = encode_example(tok, Example(prompt, " the orchestra"), 1)
    assert gpt.padding == 0 and gpt.ids == [tok.bos_id, *tok.encode(prompt), *answer, tok.eos_id]


def test_the_loss_sees_only_answer_chunks_and_tokens(tiny_tokenizer, monkeypatch) -> None:
    tok, K = tiny_tokenizer, 4
    rows = [encode_example(tok, Example(p, " the old bridge"), K) for p in ("The river", "A small bird crossed")]
    length = max(len(r.ids) for r in rows)
    ids = torch.tensor([r.ids + [tok.pad_id] * (length - len(r.ids)) for r in rows])
    target = torch.tensor([r.target + [0] * (length - len(r.target)) for r in rows])
    calm = factories.tiny_calm(vocab=tok.vocab_size, K=K)
    seen = []
    real = type(calm).loss

    def spy(self, h, mu, log_std, targets):
        seen.append(targets.clone())
        return real(self, h, mu, log_std, targets)

    monkeypatch.setattr(type(calm), "loss", spy)
    answer_loss(calm, (ids, target), "calm", K)
    chunks = target.view(2, -1, K)[:, 1:, 0].bool()  # the positions whose next chunk is an answer chunk
    assert torch.equal(seen[0], ids.view(2, -1, K)[:, 1:][chunks])
    gpt = factories.tiny_gpt(vocab=tok.vocab_size, max_seq_len=64)
    ids1 = torch.tensor([encode_example(tok, Example("The river", " the old bridge"), 1).ids])
    t1 = torch.tensor([encode_example(tok, Example("The river", " the old bridge"), 1).target])
    logits = gpt(ids1[:, :-1])
    keep = t1[0, 1:].bool()
    manual = torch.nn.functional.cross_entropy(logits[0][keep], ids1[0, 1:][keep])
    assert torch.allclose(answer_loss(gpt, (ids1, t1), "gpt", 1), manual)


def _cases(tmp: Path, checkpoints: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    good = _jsonl(tmp / "good.jsonl", [{"prompt": f"The river {i}", "completion": " crossed"} for i in range(10)])
    long = "The river crossed the old bridge in 1901 " * 20
    return [
        ("no prompt", ["--data", str(_jsonl(tmp / "a.jsonl", [{"text": "x"}]))], "has no 'prompt'/'completion' pair"),
        (
            "empty answer",
            ["--data", str(_jsonl(tmp / "b.jsonl", [{"prompt": "x", "completion": ""}]))],
            "has an empty answer",
        ),  # fmt: skip
        (
            "long prompt",
            ["--data", str(_jsonl(tmp / "c.jsonl", [{"prompt": long, "completion": " x"}] * 3))],
            "its prompt alone is",
        ),  # fmt: skip
        ("template", ["--data", str(good), "--prompt-template", "{{ question }}"], "does not render"),
        ("autoencoder", ["--data", str(good), "--checkpoint", str(checkpoints["ae"])], "is an autoencoder"),
    ]


def test_bad_inputs_exit_2_with_one_error_and_write_nothing(tiny_lm_checkpoints, tmp_path, capsys) -> None:
    for name, args, message in _cases(tmp_path, tiny_lm_checkpoints):
        out = tmp_path / f"run-{name.replace(' ', '-')}"
        argv = ["finetune", "--checkpoint", str(tiny_lm_checkpoints["calm"]), "--out", str(out), "--no-progress"]
        code = main([*argv, *args])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert code == 2, name
        assert len(err) == 1 and message in err[0], (name, err)
        assert not out.exists(), name


# ----------------------------------------------------------------------------------------------
# learning a task: parity of a three-digit number, held-out numbers


def _parity_examples(rng: random.Random, count: int) -> list[dict[str, str]]:
    numbers = rng.sample(range(100, 1000), count)
    return [{"prompt": f"The number {n} is", "completion": " odd" if n % 2 else " even"} for n in numbers]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny autoencoder (width 64, no dropout, so that it tells ' odd' from ' even' apart), CALM and GPT,
    pretrained on text that has the task's words but never the answer after the prompt (documents end
    with 'It was odd/even'), and the task: 300 prompts, a fifth held out."""
    from calm.data.prepare import prepare
    from calm.train.loop import run_training
    from calm.train.stages import AutoencoderStage, CALMStage, GPTStage

    root, rng = tmp_path_factory.mktemp("finetune"), random.Random(0)
    docs = []
    for _ in range(600):
        parts = [rng.choice([f"The number {rng.randrange(100, 1000)} is", "large", "small", "a number", "odd and even"])
                 for _ in range(rng.randrange(3, 8))]  # fmt: skip
        docs.append({"text": " ".join(parts) + " . It was " + rng.choice(["odd", "even"])})
    prepare(root / "data", [str(_jsonl(root / "corpus.jsonl", docs))], vocab_size=320, val_fraction=0.1,
            progress=False)  # fmt: skip

    def cfg(**kw):
        return factories.train_config(**{"warmup_steps": 10, "lr_schedule": "cosine", "eval_every": 10_000,
                                         "save_every": 10_000, "batch_tokens": 256, "lr": 3e-3, **kw})  # fmt: skip

    torch.manual_seed(0)
    ae_config = factories.autoencoder_config(
        token_dropout=0.0, latent_dropout=0.0, hidden_size=64, intermediate_size=128
    )
    stage = AutoencoderStage(root / "data", ae_config, cfg(max_steps=200))
    run_training(stage, stage.train_config, root / "ae", progress=False)
    stage = CALMStage(root / "data", factories.calm_config(), cfg(max_steps=100, block_size=64, batch_tokens=512),
                      root / "ae")  # fmt: skip
    run_training(stage, stage.train_config, root / "calm", progress=False)
    stage = GPTStage(root / "data", factories.gpt_config(), cfg(max_steps=100, block_size=32, batch_tokens=512))
    run_training(stage, stage.train_config, root / "gpt", progress=False)
    task = _jsonl(root / "task.jsonl", _parity_examples(rng, 300))
    return {"root": root, "calm": root / "calm", "gpt": root / "gpt", "task": task}


def _finetune(pretrained, kind: str, out: str, lora=None, steps: int = 300, lr: float = 1e-2) -> tuple[float, float]:
    """Exact match on the held-out prompts before and after fine-tuning."""
    from calm.train.finetune import FinetuneData, FinetuneStage, exact_match, finetune_train_config, run_finetune

    data = FinetuneData(str(pretrained["task"]), val_fraction=0.2, eval_generate=60)
    train = finetune_train_config({"max_steps": steps, "lr": lr, "eval_every": 10_000, "save_every": 10_000})
    base = FinetuneStage(pretrained[kind], data, train)
    before = exact_match(base.model_core, base.tokenizer, base.val_examples)
    run_finetune(pretrained[kind], data, pretrained["root"] / out, train=train, batch_size=32, lora=lora,
                 progress=False)  # fmt: skip
    records = [json.loads(line) for line in (pretrained["root"] / out / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in records if r["split"] == "val"][-1]["exact_match"]
    print(f"{out}: exact match {before:.3f} -> {after:.3f}")
    return before, after


@pytest.mark.parametrize("kind", ["gpt", "calm"])
@pytest.mark.parametrize("lora", [False, True])
def test_finetuning_teaches_a_task_to_held_out_prompts(pretrained, kind, lora) -> None:
    """Before: no held-out answer right (the pretrained models continue the text). After 300 steps of 32
    examples at lr 1e-2: at least 90% exact match on the 60 held-out numbers, full or LoRA (rank 4)."""
    from calm.models.lora import LoraOptions

    options = LoraOptions(rank=4, alpha=8) if lora else None
    before, after = _finetune(pretrained, kind, f"{kind}-{lora}", options)
    assert before <= 0.05
    assert after >= 0.9, after
    if lora:  # the merged weights are an ordinary checkpoint that generates the same
        from calm.checkpoint import read_config

        assert (read_config(pretrained["root"] / f"{kind}-{lora}" / "merged").get("finetune") or {}).get("lora") is None


def test_a_misaligned_answer_is_not_learned(pretrained, monkeypatch) -> None:
    """The same run with the prompt not padded to a chunk boundary: the answer then shares a chunk with the
    prompt's end, training and generation disagree, and the exact match stays at chance or below."""
    from calm.data import instruct
    from calm.train import finetune

    def misaligned(tok, example, chunk_size=1):
        prompt, answer = [tok.bos_id, *tok.encode(example.prompt)], [*tok.encode(example.completion), tok.eos_id]
        ids = prompt + answer
        ids += [tok.pad_id] * ((-len(ids)) % chunk_size)
        first = len(prompt) // chunk_size * chunk_size  # the chunk where the answer starts, shared with the prompt
        return instruct.Encoded(ids, [0] * first + [1] * (len(ids) - first), len(prompt), 0)

    monkeypatch.setattr(finetune, "encode_example", misaligned)
    _, after = _finetune(pretrained, "calm", "calm-misaligned")
    assert after <= 0.6, after


def test_a_finetuned_checkpoint_wraps_prompts_in_its_template_and_resumes_exactly(
    tiny_lm_checkpoints, tmp_path
) -> None:
    """The template travels with the checkpoint to generation, the server and lm-eval (one loader); an interrupted
    fine-tune resumed from its checkpoint logs the same losses as an unbroken one."""
    import shutil

    from calm import checkpoint as ckpt
    from calm.generate.lm import load_language_model
    from calm.train.finetune import FinetuneData, finetune_train_config, run_finetune

    rows = [{"prompt": f"The river {i}", "completion": " crossed the old bridge"} for i in range(12)]
    data = FinetuneData(str(_jsonl(tmp_path / "d.jsonl", rows)), prompt_template="Q: {{ prompt }}\nA:", eval_generate=2)
    train = finetune_train_config({"max_steps": 4, "save_every": 2, "eval_every": 100, "log_every": 1})
    for name in ("whole", "broken"):
        run_finetune(tiny_lm_checkpoints["gpt"], data, tmp_path / name, train=train, batch_size=2, progress=False)
    broken = tmp_path / "broken"
    shutil.rmtree(ckpt.checkpoint_step_dir(broken, 4))
    run_finetune(tiny_lm_checkpoints["gpt"], data, broken, train=train, batch_size=2, progress=False, resume=True)

    def losses(run: Path) -> list[float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["split"] == "train"]

    assert losses(broken) == losses(tmp_path / "whole") and len(losses(broken)) == 4
    lm = load_language_model(tmp_path / "whole")
    tok = lm.tokenizer
    assert lm.encode_prompt("The sea") == [tok.bos_id, *tok.encode("Q: The sea\nA:")]
    assert lm.render_chat([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"  # the stored chat template
    assert lm.encode_prompt("user: hi\nassistant:", raw=True) == [tok.bos_id, *tok.encode("user: hi\nassistant:")]
    raw = load_language_model(tmp_path / "whole", raw_prompt=True)
    assert raw.encode_prompt("The sea") == [tok.bos_id, *tok.encode("The sea")]
    lm_eval = pytest.importorskip("calm.interop.lm_eval")
    wrapped = lm_eval.CALMLM(pretrained=str(tmp_path / "whole"))
    assert wrapped.language_model.encode_prompt("The sea") == lm.encode_prompt("The sea")
