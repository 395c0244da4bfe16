"""Generation ends at the end of a document and its text never holds special tokens.

Models trained on packed data mark a document's end by emitting BOS (or EOS). Both CALM and the
GPT baseline, through ``generate_text`` / ``complete`` (the entry points of ``calm generate``, the
demo and servers), must stop there by default, keep going when asked, and never print ``<|bos|>``.
The models here emit a scripted token stream, so every boundary position is covered exactly.
"""

from __future__ import annotations

import factories
import pytest
import torch

import calm.generate.engine as gen_module
from calm.cli import main
from calm.config import GPTConfig
from calm.generate.lm import complete, generate_text
from calm.models.gpt import GPT

K = 4


class ScriptedGPT(GPT):
    """A GPT whose next token is ``script[i]`` at its i-th call (the prompt's, through ``last_logits``, is call 0)."""

    def __init__(self, config: GPTConfig, script: list[int]) -> None:
        super().__init__(config)
        self.script, self.calls = script, 0

    def _force(self, logits: torch.Tensor) -> torch.Tensor:  # (..., V): the script's token wins
        forced = torch.full_like(logits, -1e4)
        forced[..., self.script[min(self.calls, len(self.script) - 1)]] = 1e4
        self.calls += 1
        return forced

    def forward(self, ids, cache=None):
        logits = super().forward(ids, cache)
        return torch.cat([logits[:, :-1], self._force(logits[:, -1:])], dim=1)

    def last_logits(self, ids, cache=None, last=None):
        return self._force(super().last_logits(ids, cache, last))


def _scripted(kind: str, script: list[int], vocab: int, monkeypatch: pytest.MonkeyPatch):
    """A model of ``kind`` that emits ``script`` (CALM: K tokens per step, from the head's sampler)."""
    if kind == "gpt":  # the library's 2048-token context: generation never nears it
        return ScriptedGPT(factories.gpt_config(vocab_size=vocab, max_seq_len=2048), script).eval()
    chunks = [script[i : i + K] for i in range(0, len(script), K)]
    state = {"step": 0}

    def sample_step(model, h, **kwargs):
        chunk = chunks[min(state["step"], len(chunks) - 1)]
        state["step"] += 1
        return torch.tensor([chunk] * h.shape[0]), [1.0] * h.shape[0]

    monkeypatch.setattr(gen_module, "sample_step", sample_step)
    return factories.tiny_calm(vocab=vocab, K=K, num_target_samples=8).eval()


@pytest.mark.parametrize("kind", ["calm", "gpt"])
@pytest.mark.parametrize("boundary", ["bos", "eos"])
@pytest.mark.parametrize("offset", [0, 1, 3])  # where the boundary falls inside a CALM chunk
def test_generation_stops_at_the_end_of_a_document(kind, boundary, offset, tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    words = tok.encode(" the river crossed the old bridge in 1901 and the orchestra")
    before = words[: K + offset]
    stop = tok.bos_id if boundary == "bos" else tok.eos_id
    script = before + [stop] + words[:12]
    model = _scripted(kind, script, tok.vocab_size, monkeypatch)
    streamed: list[str] = []
    (result,) = complete(model, tok, ["The history"], 16, temperature=1.0, seed=0, stream=streamed.append)
    assert result.finish_reason == "stop"
    assert result.token_ids == before
    assert result.text == tok.decode(before) == "".join(streamed)


@pytest.mark.parametrize("kind", ["calm", "gpt"])
def test_keep_going_past_document_ends_without_printing_special_tokens(kind, tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    words = tok.encode(" the river crossed the old bridge")
    script = words[:3] + [tok.bos_id] + words[3:5] + [tok.eos_id, tok.pad_id] + words[5:] + words * 3
    model = _scripted(kind, script, tok.vocab_size, monkeypatch)
    streamed: list[str] = []
    texts = generate_text(model, tok, ["The history"], 20, seed=0, stream=streamed.append, stop_at_document_end=False)
    plain = [t for t in script[:20] if t not in (tok.bos_id, tok.eos_id, tok.pad_id)]
    assert texts == [tok.decode(plain)] and "".join(streamed) == texts[0]
    for special in ("<|bos|>", "<|eos|>", "<|pad|>"):
        assert special not in texts[0]
    model = _scripted(kind, script, tok.vocab_size, monkeypatch)
    (result,) = complete(model, tok, ["The history"], 20, seed=0, stop_at_document_end=False)
    assert result.finish_reason == "length" and len(result.token_ids) == 20


def test_generate_cli_stops_for_both_kinds(data_dir, tmp_path, capsys, monkeypatch, tiny_tokenizer):
    """``calm generate`` on real tiny checkpoints: the output never shows a special token, with or
    without stopping (the checkpoints are untrained, so BOS/EOS come up by chance or not at all)."""
    lm = factories.set_args({**factories.dotted("model", factories.TINY_LM), "model.max_seq_len": 64})
    lm += ["--set", "train.block_size=16"]
    fast = ["--precision", "fp32", "--max-steps", "1", "--batch-tokens", "64", "--no-progress"]
    fast += ["--set", "train.eval_tokens=64"]
    run = tmp_path / "gpt"
    assert main(["train-gpt", "--data", str(data_dir), "--out", str(run), *lm, *fast]) == 0
    for extra in ([], ["--no-stop-at-document-end"]):
        capsys.readouterr()
        argv = ["generate", "--checkpoint", str(run), "--prompt", "The river", "--max-new-tokens", "40"]
        assert main([*argv, "--seed", "0", "--quiet", *extra]) == 0
        out = capsys.readouterr().out
        assert out.startswith("The river") and "<|" not in out


def test_a_seeded_exact_sampler_request_is_reproducible_at_any_temperature(tiny_tokenizer) -> None:
    """1/T = 1.5 needs stage-2 uniforms (paper Alg. 1); they come from the request's generator, so the same
    seed gives the same text, and another seed another one."""
    model = factories.tiny_calm(vocab=tiny_tokenizer.vocab_size, K=K, head_std=0.05).eval()

    def text(seed: int) -> str:
        kw = dict(temperature=1 / 1.5, sampler="exact", seed=seed, stop_at_document_end=False)
        return complete(model, tiny_tokenizer, ["The river"], 24, **kw)[0].text

    assert text(3) == text(3)
    assert len({text(s) for s in range(4)}) > 1
