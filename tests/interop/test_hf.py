"""`calm eval --hf-model`: a local Hugging Face causal LM scored by the same BrierLM code."""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from calm.eval.brier import _hf_adapter, _rollout_mask, evaluate_checkpoint, token_lm_block_brier  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("hf")
    cfg = transformers.LlamaConfig(
        vocab_size=tiny_tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tiny_tokenizer.bos_id,
        eos_token_id=tiny_tokenizer.eos_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer.backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(out)
    return out


def test_incremental_and_tree_rollout_logits_equal_full_forward(hf_dir, tiny_tokenizer):
    model, _, step, new_cache = _hf_adapter(str(hf_dir), "cpu")
    ids = torch.tensor([[tiny_tokenizer.bos_id] + tiny_tokenizer.encode("The river crossed the old bridge in 1901 .")])
    with torch.no_grad():
        full = model(ids).logits[0]
        cache = new_cache(64)
        prefix = step(ids[:, :5], cache)[0]
        starts = torch.tensor([1, 3])
        rollout = step(ids[0, starts + 1][None], cache, positions=starts + 1, attn_mask=_rollout_mask(5, starts, 1))[0]
    torch.testing.assert_close(prefix, full[:5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rollout, full[starts + 1], atol=1e-5, rtol=1e-5)


def test_eval_hf_model_end_to_end(hf_dir, tiny_texts, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_texts[:10]))
    result = evaluate_checkpoint(None, str(data), hf_model=str(hf_dir), context_tokens=32, progress=False)
    assert result["kind"] == "hf" and result["blocks"] >= 1
    assert result["perplexity"] > 1 and result["bits_per_byte"] > 0
    assert {"brier1", "brier4", "brierlm", "brierlm_se"} <= set(result)


@pytest.mark.parametrize("mode", ["exact", "two_sample"])
def test_eval_hf_model_on_a_1024_token_window(hf_dir, tiny_texts, tmp_path, mode):
    """A 1,024-token window: 1,020 scored positions, so two rollout groups of 512 and a
    cache crop between them (transformers 5 refuses the positive ``crop`` argument used before)."""
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_texts))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. "`past_key_values` is deprecated"
        result = evaluate_checkpoint(
            None, str(data), hf_model=str(hf_dir), context_tokens=1024, mode=mode, max_blocks=1, progress=False
        )
    assert result["blocks"] == 1 and result["tokens"] == 1024 and result["estimator"] == mode
    assert result["perplexity"] > 1


@pytest.mark.parametrize("group_size", [7, 512])
def test_every_adapter_call_matches_a_full_forward(hf_dir, tiny_tokenizer, tiny_texts, group_size):
    """Drive the adapter exactly as BrierLM does (prefix, rollout depths 1..3, crop back to the
    prefix for each new group) and check logit rows of every call against a plain forward of the
    token sequence that row stands for: the prefix up to its start, then its own chain tokens."""
    model, _, step, new_cache = _hf_adapter(str(hf_dir), "cpu")
    ids = [tiny_tokenizer.bos_id]
    for text in tiny_texts:
        ids += tiny_tokenizer.encode(text)
    block = torch.tensor([ids[: 40 if group_size < 40 else 600]])
    calls = []

    def spy(tokens, cache, positions=None, attn_mask=None):
        out = step(tokens, cache, positions=positions, attn_mask=attn_mask)
        calls.append((tokens[0].clone(), None if positions is None else positions.clone(), out[0].clone()))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        token_lm_block_brier(spy, new_cache, block, generator=torch.Generator().manual_seed(0), group_size=group_size)
    S, depth = block.shape[1] - 1, 3
    groups = -(-(S - depth) // group_size)
    assert groups >= 2 and len(calls) == 1 + groups * depth
    with torch.no_grad():
        full = model(block[:, :-1]).logits[0]
        torch.testing.assert_close(calls[0][2], full, atol=1e-4, rtol=1e-4)
        for g in range(groups):
            chain = []
            for j in range(1, depth + 1):
                tokens, positions, logits = calls[1 + g * depth + j - 1]
                chain.append(tokens)
                starts = positions - j
                for row in sorted({0, len(starts) // 2, len(starts) - 1}):
                    own = torch.stack([c[row] for c in chain])
                    seq = torch.cat([block[0, : int(starts[row]) + 1], own])[None]
                    torch.testing.assert_close(logits[row], model(seq).logits[0, -1], atol=1e-4, rtol=1e-4)
