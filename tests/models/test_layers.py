"""Shared Transformer layers: KV-cache and tree-mask forwards equal the plain causal forward."""

import pytest
import torch

from calm.config import TransformerConfig
from calm.models.layers import Backbone, RowKVCache


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


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_row_cache_rows_at_their_own_lengths_match_each_sequence_alone(kv_heads):
    """Continuous batching: rows of different lengths join, step together and leave, and each row's outputs
    are those of its sequence decoded alone with a KVCache."""
    torch.manual_seed(0)
    bb = make_backbone(kv_heads)
    d = bb.config.hidden_size
    prompts = [torch.randn(1, n, d) for n in (3, 7, 1)]
    inputs = [torch.randn(1, 5, d) for _ in prompts]  # the inputs each sequence is fed step by step

    def alone(b):
        cache = bb.new_cache(1, max_len=16)
        outs = [bb(prompts[b], cache)[:, -1]]
        outs += [bb(inputs[b][:, t : t + 1], cache)[:, -1] for t in range(5)]
        return torch.cat(outs)

    rows = RowKVCache(bb.config.num_layers, bb.config.kv_heads, bb.config.head_dim)
    got: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    order: list[int] = []  # sequence of each row
    fed = {0: 0, 1: 0, 2: 0}

    def join(b):
        cache = bb.new_cache(1, max_len=prompts[b].shape[1])
        got[b].append(bb(prompts[b], cache)[0, -1])
        assert rows.add(cache, max_len=16) == len(order)
        order.append(b)

    join(0)
    join(1)
    for step in range(5):
        if step == 2:
            join(2)  # joins while the others are mid-way
        x = torch.cat([inputs[b][:, fed[b] : fed[b] + 1] for b in order])
        y = bb(x, rows)[:, -1]
        for i, b in enumerate(order):
            got[b].append(y[i])
            fed[b] += 1
        if step == 3:  # sequence 0 leaves; the last row takes its place
            rows.remove(0)
            order[0] = order[-1]
            order.pop()
    for b in range(3):
        want = alone(b)[: len(got[b])]
        torch.testing.assert_close(torch.stack(got[b]), want, atol=1e-5, rtol=1e-5)
    assert len(got[0]) == 5 and len(got[1]) == 6 and len(got[2]) == 4
