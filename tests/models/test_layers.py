"""Shared Transformer layers: KV-cache and tree-mask forwards equal the plain causal forward."""

import torch

from calm.config import TransformerConfig
from calm.models.layers import Backbone


def make_backbone(kv_heads=None) -> Backbone:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=10,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=kv_heads,
        max_seq_len=64,
    )
    return Backbone(cfg).eval()


def test_incremental_cache_matches_full_forward():
    for kv in (None, 2):
        bb = make_backbone(kv)
        x = torch.randn(2, 12, 32)
        full = bb(x)
        cache = bb.new_cache(2)
        parts = [bb(x[:, :5], cache), bb(x[:, 5:6], cache), bb(x[:, 6:12], cache)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_tree_mask_rollout_matches_separate_sequences():
    """A chain token attending to base[0..t] plus itself equals running base[0..t] + token."""
    bb = make_backbone()
    x = torch.randn(1, 8, 32)
    extra = torch.randn(1, 3, 32)  # one chain token for each of the starts 2, 4, 6
    starts = torch.tensor([2, 4, 6])
    cache = bb.new_cache(1)
    bb(x, cache)
    mask = torch.cat([torch.arange(8)[None] <= starts[:, None], torch.eye(3, dtype=torch.bool)], 1)
    got = bb(extra, cache, positions=starts + 1, attn_mask=mask)[0]
    for g, t in enumerate(starts.tolist()):
        ref = bb(torch.cat([x[:, : t + 1], extra[:, g : g + 1]], 1))[0, -1]
        torch.testing.assert_close(got[g], ref, atol=1e-5, rtol=1e-5)


def test_context_overflow_is_a_clear_error():
    bb = make_backbone()
    try:
        bb(torch.randn(1, 65, 32))
    except ValueError as e:
        assert "context" in str(e)
    else:
        raise AssertionError("expected a ValueError")
