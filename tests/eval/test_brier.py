"""BrierLM drivers (paper §5): the batched tree-mask rollouts of the CALM and token estimators are unbiased."""

import re

import factories
import pytest
import torch
from factories import assert_unbiased, brier_gpt, enumerate_exact_brier

from calm.eval.brier import calm_block_brier, evaluate_checkpoint, gpt_block_brier, make_blocks, score_block
from calm.generate.lm import LanguageModelError, as_language_model
from calm.models.calm import CALM


@pytest.mark.parametrize("mode", ["exact", "two_sample"])
def test_gpt_driver_is_unbiased_against_enumeration(mode):
    model = brier_gpt()
    seq = [3, 1, 4, 1, 5, 6, 2, 6, 5, 3]
    exact = enumerate_exact_brier(model, seq)
    gen = torch.Generator().manual_seed(11)
    block = torch.tensor([seq])
    reps = torch.stack([gpt_block_brier(model, block, generator=gen, mode=mode) for _ in range(300)])
    assert reps.shape[1:] == exact.shape
    assert_unbiased(reps.mean(1), exact.mean(0).expand(len(reps), -1))


def context_sensitive_calm(K: int) -> CALM:
    """A 1-layer CALM over 3 ids, seeded 0, in eval mode. A large init (std 0.5, and 1.0 for the head's output
    layer) makes the hidden state depend strongly on the context, so a rollout that sees the wrong prefix
    changes the collision rate measurably."""
    autoencoder = dict(hidden_size=16, intermediate_size=16, init_std=0.5)
    lm = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, init_std=0.5)
    return factories.tiny_calm(
        vocab=3, K=K, latent=4, autoencoder=autoencoder, num_samples=8, num_target_samples=100, head_std=1.0, **lm
    ).eval()


@torch.no_grad()
def naive_collision(model: CALM, block: torch.Tensor, gen: torch.Generator, n_max: int = 4) -> torch.Tensor:
    """Σ P(path)² estimated from two fully independent rollouts per position, no cache, no tree mask."""
    K = model.chunk_size
    chunks = block.view(1, -1, K)
    S = chunks.shape[1] - 1
    span = -(-n_max // K)
    out = []
    for t in range(S - span + 1):
        paths = []
        for _ in range(2):
            prefix = chunks[:, : t + 1]
            toks = []
            for _ in range(span):
                h = model.hidden_states(prefix)[:, -1]
                c = model.autoencoder.decode_ids(model.head.sample(h, 1, gen)[0])  # (1, K)
                toks.append(c[0])
                prefix = torch.cat([prefix, c[:, None]], 1)
            paths.append(torch.cat(toks)[:n_max])
        out.append(torch.cumprod((paths[0] == paths[1]).double(), 0))
    return torch.stack(out)


def test_calm_rollout_collision_matches_independent_paths():
    model = context_sensitive_calm(K=2)
    block = torch.tensor([[0, 1, 2, 0, 1, 1, 2, 2, 0, 1, 0, 2]])  # 6 chunks
    gen = torch.Generator().manual_seed(0)
    fast, slow = [], []
    for _ in range(150):
        est = calm_block_brier(model, block, generator=gen)
        assert est.shape == (4, 4)  # S = 5 input steps, span 2 -> 4 scored chunks
        # recover the collision term: est = acc1 + acc2 - coll
        fast.append(est)
        slow.append(naive_collision(model, block, gen))
    fast, slow = torch.stack(fast), torch.stack(slow)
    # compare E[est] against E[acc1 + acc2] - E[coll_naive]; acc terms come from the same model
    chunks = block.view(1, -1, 2)
    assert torch.all(slow[:, :, 0] <= 1)
    # Monte-Carlo check on the collision part only: the driver's coll = acc1 + acc2 - est
    gen2 = torch.Generator().manual_seed(1)
    acc_mean = []
    for _ in range(150):
        h = model.hidden_states(chunks[:, :-1])[0]
        pred = model.autoencoder.decode_ids(model.head.sample(h, 2, gen2))
        tgt = chunks[0, 1:].reshape(-1).unfold(0, 4, 2)[:4]
        s = [pred[i].reshape(-1).unfold(0, 4, 2)[:4] for i in range(2)]
        acc_mean.append(sum(torch.cumprod((x == tgt).double(), 1) for x in s))
    coll_fast = torch.stack(acc_mean).mean(0) - fast.mean(0)
    coll_slow = slow.mean(0)
    se = (slow.var(0) / len(slow) + fast.var(0) / len(fast) + torch.stack(acc_mean).var(0) / 150).sqrt()
    assert coll_slow[:, 1:].mean() > 0.05  # collisions beyond the first chunk actually happen
    assert torch.all((coll_fast - coll_slow).abs() <= 4 * se + 1e-9), (coll_fast, coll_slow, se)


def test_calm_k4_uses_chunk_prefixes():
    model = context_sensitive_calm(K=4)
    block = torch.randint(0, 3, (1, 40))
    est = calm_block_brier(model, block, generator=torch.Generator().manual_seed(0))
    assert est.shape == (9, 4)
    assert torch.all(est <= 2) and torch.all(est >= -1)


def test_make_blocks_drops_the_remainder_and_needs_one_block():
    blocks = make_blocks([[1, 2, 3], [1, 4, 5, 6]], 3)
    assert blocks.tolist() == [[1, 2, 3], [1, 4, 5]]
    with pytest.raises(ValueError, match="fewer than one block"):
        make_blocks([[1, 2]], 8)


@pytest.mark.parametrize("K", [1, 2])
def test_calm_rollout_hidden_states_equal_naive_recomputation(K):
    """Every rollout step conditions on exactly the true prefix plus sample 1's chain."""
    model = context_sensitive_calm(K=K)
    block = torch.randint(0, 3, (1, 12 * K), generator=torch.Generator().manual_seed(3))
    calls = []
    real_sample = model.head.sample

    def spy(h, n, generator=None):
        z = real_sample(h, n, generator)
        calls.append((h.clone(), model.autoencoder.decode_ids(z)))
        return z

    model.head.sample = spy
    calm_block_brier(model, block, generator=torch.Generator().manual_seed(0), group_size=4)
    model.head.sample = real_sample
    chunks = block.view(1, -1, K)
    S = chunks.shape[1] - 1
    depth = -(-4 // K) - 1
    P = S - depth
    base_h, base_pred = calls[0]
    torch.testing.assert_close(base_h, model.hidden_states(chunks[:, :-1])[0], atol=1e-5, rtol=1e-5)
    rollouts = calls[1:]
    assert len(rollouts) == depth * -(-P // 4)  # one call per depth per group of 4 positions
    for group_index in range(-(-P // 4)):
        starts = list(range(group_index * 4, min(P, group_index * 4 + 4)))
        for j in range(depth):
            h, pred = rollouts[group_index * depth + j]
            for g, t in enumerate(starts):
                path = [base_pred[0, t]] + [rollouts[group_index * depth + i][1][0, g] for i in range(j)]
                seq = torch.cat([chunks[0, : t + 1], torch.stack(path)])[None]
                ref = model.hidden_states(seq)[0, -1]
                torch.testing.assert_close(h[g], ref, atol=1e-4, rtol=1e-4)


def test_score_block_is_the_estimator_of_each_kind() -> None:
    """One call for any language model: the CALM estimator for CALM (no log-probs), the token estimator
    (with the targets' log-probs) for the GPT; the same draws as calling the estimators directly."""
    calm_lm = as_language_model(context_sensitive_calm(K=2), tokenizer=None)
    block = torch.randint(0, 3, (1, 16), generator=torch.Generator().manual_seed(1))
    est, logp = score_block(calm_lm, block, generator=torch.Generator().manual_seed(0))
    assert logp is None
    assert torch.equal(est, calm_block_brier(calm_lm.model, block, generator=torch.Generator().manual_seed(0)))
    gpt_lm = as_language_model(brier_gpt(), tokenizer=None)
    block = torch.tensor([[3, 1, 4, 1, 5, 6, 2, 6, 5, 3]])
    for mode in ("exact", "two_sample"):
        est, logp = score_block(gpt_lm, block, generator=torch.Generator().manual_seed(0), mode=mode)
        direct = gpt_block_brier(gpt_lm.model, block, generator=torch.Generator().manual_seed(0), mode=mode)
        assert torch.equal(est, direct) and logp.shape == (block.shape[1] - 1,) and bool((logp <= 0).all())


def test_evaluate_checkpoint_refuses_an_autoencoder(tiny_lm_checkpoints) -> None:
    ae = str(tiny_lm_checkpoints["ae"])
    message = re.escape(ae) + " is an autoencoder; pass a CALM or GPT .*calm eval-ae"
    with pytest.raises(LanguageModelError, match=message):
        evaluate_checkpoint(ae, "unused.txt", device="cpu", progress=False)


def test_max_tokens_is_whole_blocks_and_says_so(tiny_lm_checkpoints, tiny_data_dir, capsys) -> None:
    from calm.cli import main

    gpt = str(tiny_lm_checkpoints["gpt"])
    argv = ["eval", "--checkpoint", gpt, "--data", str(tiny_data_dir), "--no-progress", "--diagnostic-positions", "0"]
    assert main([*argv, "--max-tokens", "50"]) == 0
    assert "note: --max-tokens 50 scores 32 tokens: whole blocks of 32 tokens" in capsys.readouterr().err
    assert main([*argv, "--max-tokens", "64"]) == 0
    assert "note:" not in capsys.readouterr().err  # two whole blocks: nothing to say


@pytest.mark.parametrize(
    ("kind", "flag", "too_long"), [("calm", "--context-steps", "1000"), ("gpt", "--context-tokens", "1000")]
)
def test_the_context_a_refusal_suggests_works(kind, flag, too_long, tiny_lm_checkpoints, tiny_data_dir, capsys) -> None:
    from calm.cli import main

    argv = ["eval", "--checkpoint", str(tiny_lm_checkpoints[kind]), "--data", str(tiny_data_dir), "--no-progress"]
    assert main([*argv, flag, too_long, "--max-blocks", "1"]) == 2
    suggested = re.search(rf"pass {flag} (\d+) or less", capsys.readouterr().err).group(1)
    assert main([*argv, flag, suggested, "--max-blocks", "1", "--diagnostic-positions", "0"]) == 0
