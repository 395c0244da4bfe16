"""`calm eval --hf-model`: a local Hugging Face causal LM scored by the same BrierLM code."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from calm.brier_eval import _hf_adapter, _rollout_mask, evaluate_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("hf")
    cfg = transformers.LlamaConfig(
        vocab_size=tiny_tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
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
