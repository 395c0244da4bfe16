"""BrierLM estimators (paper §5): unbiasedness against exact enumeration, BrierLM, its SE.

Statistical tests use fixed seeds and compare a sample mean with the exact value within 3 standard
errors of that mean; with fixed seeds they are deterministic.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from factories import N_MAX, assert_unbiased, brier_gpt, enumerate_exact_brier

from calm.eval.brierlm import (
    BrierAccumulator,
    brier_exact_form,
    brier_two_sample,
    brierlm,
    exact_brier,
    ratio_of_means,
    token_lm_brier,
)

# ---------------------------------------------------------------------------------------------
# pure functions


def test_exact_brier_and_two_sample_by_hand() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    assert exact_brier(probs, 0) == pytest.approx(2 * 0.5 - (0.25 + 0.09 + 0.04))
    s1 = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 4, 4]])
    s2 = torch.tensor([[1, 2, 0], [1, 5, 3], [4, 4, 4]])
    y = torch.tensor([[1, 2, 3], [0, 2, 3], [4, 4, 5]])
    expected = torch.tensor(
        [
            [1 + 1 - 1, 1 + 1 - 1, 1 + 0 - 0],  # both hit 2 tokens, then s2 misses and they part
            [0 + 0 - 1, 0 + 0 - 0, 0.0],  # a collision on a wrong first token costs 1
            [1 + 1 - 1, 1 + 1 - 1, 0 + 0 - 1],
        ]
    )
    torch.testing.assert_close(brier_two_sample(s1, s2, y), expected)


def test_exact_form_combines_cumprod_and_collision() -> None:
    prob_target = torch.tensor([[0.5, 0.4, 0.1]])
    collision = torch.tensor([[0.3, 0.2, 0.0]])
    expected = torch.tensor([[2 * 0.5 - 0.3, 2 * 0.2 - 0.2, 2 * 0.02]])
    torch.testing.assert_close(brier_exact_form(prob_target, collision), expected)


def test_brierlm_of_table5_row() -> None:
    assert brierlm([0.2181, 0.0688, 0.0259, 0.0125]) == pytest.approx(4.70, abs=0.01)
    assert brierlm([0.2, -0.01, 0.1, 0.1]) == 0.0  # a negative product is clipped


# ---------------------------------------------------------------------------------------------
# unbiasedness on a Markov chain (exact Brier-n by a recursion over all paths)


def markov_setup(seed: int = 0, vocab: int = 5, length: int = 3000):
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=g, dtype=torch.float64), dim=-1)
    seq = [0]
    for _ in range(length - 1):
        seq.append(int(torch.multinomial(trans[seq[-1]], 1, generator=g)))
    ids = torch.tensor([seq])
    log_trans = trans.float().log()

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        return log_trans[x]  # (B, L, V): depends only on the current token, hence causal

    # sum over n-token paths from state s of P(path)^2: c_n(s) = sum_x P(x|s)^2 c_{n-1}(x)
    coll = [torch.ones(vocab, dtype=torch.float64)]
    for _ in range(N_MAX):
        coll.append((trans.pow(2) * coll[-1][None]).sum(-1))
    exact = torch.zeros(length - N_MAX, N_MAX, dtype=torch.float64)
    for t in range(length - N_MAX):
        p = 1.0
        for n in range(1, N_MAX + 1):
            p *= float(trans[seq[t + n - 1], seq[t + n]])
            exact[t, n - 1] = 2 * p - coll[n][seq[t]]
    return ids, logits_fn, exact


@pytest.mark.parametrize("mode", ["exact", "two_sample"])
def test_unbiased_on_markov_chain(mode: str) -> None:
    ids, logits_fn, exact = markov_setup()
    assert exact[:, 3].mean() > 0.05  # peaked enough that Brier-4 is not negligible
    estimates = token_lm_brier(logits_fn, ids, N_MAX, torch.Generator().manual_seed(1), mode=mode)
    assert estimates.shape == exact.shape
    # positions are independent given the sequence: only the sampling is random
    assert_unbiased(estimates, exact)


def test_exact_and_two_sample_forms_agree_on_markov_chain() -> None:
    ids, logits_fn, _ = markov_setup(seed=3)
    a = token_lm_brier(logits_fn, ids, N_MAX, torch.Generator().manual_seed(2), mode="exact").double()
    b = token_lm_brier(logits_fn, ids, N_MAX, torch.Generator().manual_seed(2), mode="two_sample").double()
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 3 * se).all()
    # the point of the exact form: lower variance given the same sequence
    assert (a.var(0) < b.var(0)).all()


# ---------------------------------------------------------------------------------------------
# unbiasedness with a real (tiny, random) Transformer, exact Brier-n by enumerating V^n paths
# (factories.brier: brier_gpt, enumerate_exact_brier)


@pytest.mark.parametrize("mode", ["exact", "two_sample"])
def test_unbiased_on_tiny_gpt(mode: str) -> None:
    model = brier_gpt()
    seq = [3, 1, 4, 1, 5, 6, 2, 6, 5, 3]
    exact = enumerate_exact_brier(model, seq)
    assert exact[:, 2].abs().mean() > 0.02  # a peaked model, so higher n carry signal
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor([seq])
    with torch.no_grad():
        reps = torch.stack([token_lm_brier(model, ids, N_MAX, gen, mode=mode) for _ in range(300)])
    assert_unbiased(reps.mean(1), exact.mean(0).expand(len(reps), -1))


def test_exact_form_has_lower_variance_on_tiny_gpt() -> None:
    model = brier_gpt()
    ids = torch.tensor([[0, 2, 4, 6, 1, 3, 5, 0, 2]])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        exact = torch.stack([token_lm_brier(model, ids, N_MAX, gen, mode="exact") for _ in range(100)])
        two = torch.stack([token_lm_brier(model, ids, N_MAX, gen, mode="two_sample") for _ in range(100)])
    assert exact[:, :, 0].var(0).max() < 1e-10  # Brier-1 of the exact form involves no sampling
    assert (exact.var(0).mean(0) < two.var(0).mean(0)).all()


def test_token_lm_brier_rejects_bad_input() -> None:
    model = brier_gpt()
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        token_lm_brier(model, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="no position"):
        token_lm_brier(model, torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# accumulator


def synthetic_estimates(num: int, seed: int) -> torch.Tensor:
    """Two-sample estimates for i.i.d. tokens from p = (0.7, 0.2, 0.1): Brier-n = 0.54^n."""
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([0.7, 0.2, 0.1])
    draw = lambda: torch.multinomial(p, num * N_MAX, replacement=True, generator=g).view(num, N_MAX)
    return brier_two_sample(draw(), draw(), draw())


def test_accumulator_means_and_merge() -> None:
    x = synthetic_estimates(4000, seed=0)
    acc = BrierAccumulator()
    for block in x.split(100):
        acc.add(block)
    assert acc.means() == pytest.approx(x.double().mean(0).tolist(), abs=1e-12)
    expected = [0.54**n for n in range(1, N_MAX + 1)]
    for m, se, e in zip(acc.means(), acc.standard_errors(), expected):
        assert abs(m - e) < 3 * se
    # merging halves (one via its state_dict) equals accumulating everything in one place
    a, b = BrierAccumulator(), BrierAccumulator()
    for i, block in enumerate(x.split(100)):
        (a if i % 2 else b).add(block)
    a.merge(b.state_dict())
    restored = BrierAccumulator()
    restored.load_state_dict(a.state_dict())
    assert restored.summary() == pytest.approx(acc.summary())
    summary = acc.summary()
    assert set(summary) >= {f"brier{n}" for n in range(1, 5)} | {"brierlm", "brierlm_se", "positions"}
    assert summary["positions"] == 4000 and summary["brier1"] == pytest.approx(100 * acc.means()[0])


def test_delta_method_se_matches_bootstrap() -> None:
    x = synthetic_estimates(3000, seed=1).double()
    acc = BrierAccumulator()
    acc.add(x)
    g = torch.Generator().manual_seed(2)
    boot = []
    for _ in range(300):
        idx = torch.randint(0, len(x), (len(x),), generator=g)
        boot.append(brierlm(x[idx].mean(0).tolist()))
    bootstrap_se = torch.tensor(boot).std().item()
    assert 0.8 < acc.brierlm_se() / bootstrap_se < 1.25


def test_clustered_se_sees_within_block_correlation() -> None:
    # 200 blocks of 50 positions whose values share a block effect: the i.i.d. SE is far too small
    g = torch.Generator().manual_seed(3)
    effect = 0.1 * torch.randn(200, 1, 1, generator=g, dtype=torch.float64)
    x = 0.3 + effect + 0.1 * torch.randn(200, 50, N_MAX, generator=g, dtype=torch.float64)
    acc = BrierAccumulator()
    for block in x:
        acc.add(block)
    true_se = math.sqrt(0.1**2 / 200 + 0.1**2 / (200 * 50))
    clustered, iid = acc.standard_errors(clustered=True)[0], acc.standard_errors()[0]
    assert 0.8 < clustered / true_se < 1.25
    assert iid < 0.5 * clustered


def test_accumulator_errors() -> None:
    acc = BrierAccumulator()
    with pytest.raises(ValueError, match="call add"):
        acc.means()
    with pytest.raises(ValueError, match=r"\(positions, 4\)"):
        acc.add(torch.zeros(3, 2))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_two_sample_enumeration_identity(n: int) -> None:
    # E[1{x1=y} + 1{x2=y} - 1{x1=x2}] = 2P(y) - sum P^2, checked exactly over all outcome pairs
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    y = torch.tensor([[0] * n])
    total = 0.0
    for a in itertools.product(range(3), repeat=n):
        for b in itertools.product(range(3), repeat=n):
            weight = float(p[list(a)].prod() * p[list(b)].prod())
            est = brier_two_sample(torch.tensor([a]), torch.tensor([b]), y)[0, n - 1]
            total += weight * float(est)
    assert total == pytest.approx(2 * 0.6**n - float(p.pow(2).sum()) ** n)


def test_brierlm_is_zero_when_any_brier_n_is_not_positive() -> None:
    # four negative terms multiply to a positive product; that must not read as a good model
    assert brierlm([-0.1, -0.05, -0.02, -0.01]) == 0.0
    assert brierlm([0.2, -0.05, 0.02, 0.01]) == 0.0
    assert brierlm([0.2181, 0.0688, 0.0259, 0.0125]) == pytest.approx(4.70, abs=0.01)


def test_ratio_of_means_and_its_paired_standard_error() -> None:
    # a scaled copy of the reference: the ratio is the scale, exactly, and pairing leaves no error
    sums, positions = [3.0, 5.0, 1.0, 7.0], [10, 10, 10, 10]
    ratio, se = ratio_of_means([2 * s for s in sums], positions, sums, positions)
    assert ratio == pytest.approx(2.0) and se == pytest.approx(0.0, abs=1e-12)
    unpaired_ratio, unpaired_se = ratio_of_means([2 * s for s in sums], positions, sums, positions, paired=False)
    assert unpaired_ratio == pytest.approx(2.0) and unpaired_se > 0.1  # the blocks' spread counts twice


def test_ratio_of_means_standard_error_matches_the_spread_over_resampled_blocks() -> None:
    # paired blocks whose difficulty both models share: the delta-method SE is the bootstrap's
    gen = np.random.default_rng(0)
    difficulty = gen.uniform(0.2, 1.0, 400)
    a = difficulty * 0.5 + gen.normal(0, 0.05, 400)
    b = difficulty + gen.normal(0, 0.05, 400)
    n = np.full(400, 1)
    ratio, se = ratio_of_means(a, n, b, n)
    boot = []
    for _ in range(2000):
        idx = gen.integers(0, 400, 400)
        boot.append(a[idx].sum() / b[idx].sum())
    assert ratio == pytest.approx(a.sum() / b.sum())
    assert se == pytest.approx(float(np.std(boot)), rel=0.1)
    assert ratio_of_means(a, n, b, n, paired=False)[1] > 2 * se  # pairing removes the shared difficulty


def test_ratio_of_means_refuses_what_has_no_ratio() -> None:
    with pytest.raises(ValueError, match="paired blocks must match"):
        ratio_of_means([1.0, 2.0], [1, 1], [1.0], [1])
    with pytest.raises(ValueError, match="denominator's mean is 0"):
        ratio_of_means([1.0], [1], [0.0], [1])
    assert math.isnan(ratio_of_means([1.0], [1], [2.0], [1])[1])  # one block: no standard error
