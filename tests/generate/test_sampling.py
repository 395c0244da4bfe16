"""Tests for calm.generate.sampling: likelihood-free temperature sampling (paper §6, Alg. 1 and Alg. 2)."""

import bisect
import itertools
import math
import random
from collections import Counter

import pytest
import torch

from calm.generate.sampling import (
    SamplingBudgetExceeded,
    SamplingStats,
    batch_effective_temperature,
    batch_temperature_probs,
    batch_temperature_sample,
    batch_temperature_select,
    exact_temperature_sample,
    expected_draws,
)

PROBS = [0.35, 0.25, 0.15, 0.12, 0.08, 0.05]  # toy categorical P over 6 outcomes
# chi-square critical value for 5 degrees of freedom at significance 1e-3
CHI2_CRITICAL_DF5 = 20.515


def tempered(probs, temperature):
    weights = [p ** (1 / temperature) for p in probs]
    total = sum(weights)
    return [w / total for w in weights]


def categorical_draw(probs, seed):
    """A draw() for P, as the head + decoder would be in CALM."""
    rng = random.Random(seed)
    cumulative = list(itertools.accumulate(probs))
    cumulative[-1] = 1.0
    return lambda: bisect.bisect_right(cumulative, rng.random())


# --- exact sampler (Algorithm 1) -------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 1 / 2, 1 / 3, 0.7])
def test_exact_sampler_matches_tempered_distribution(temperature):
    """20,000 samples, seed 0: chi-square against P^(1/T)/Z must stay under the p = 1e-3 critical
    value, and the mean number of draws must be within 3% of expected_draws (its standard error is
    under 1%)."""
    num = 20_000
    draw = categorical_draw(PROBS, seed=0)
    rng = random.Random(1)
    counts = Counter()
    total_draws = 0
    for _ in range(num):
        sample, num_draws, exhausted = exact_temperature_sample(draw, temperature, rng=rng)
        assert not exhausted
        counts[sample] += 1
        total_draws += num_draws
    target = tempered(PROBS, temperature)
    chi2 = sum((counts[x] - num * q) ** 2 / (num * q) for x, q in enumerate(target))
    assert chi2 < CHI2_CRITICAL_DF5, f"chi2={chi2:.2f}, counts={sorted(counts.items())}"
    expected = expected_draws(PROBS, temperature)
    assert total_draws / num == pytest.approx(expected, rel=0.03)


def test_exact_sampler_without_early_exit_matches_theorem_2():
    """Paper-literal stage 1 (always n draws) at T = 1/3: mean draws within 3% of Theorem 2."""
    num, temperature = 5_000, 1 / 3
    draw = categorical_draw(PROBS, seed=2)
    rng = random.Random(3)
    total = sum(exact_temperature_sample(draw, temperature, rng=rng, early_exit=False)[1] for _ in range(num))
    theorem_2 = 3 / sum(p**3 for p in PROBS)
    assert expected_draws(PROBS, temperature, early_exit=False) == pytest.approx(theorem_2)
    assert total / num == pytest.approx(theorem_2, rel=0.03)
    assert expected_draws(PROBS, temperature) < theorem_2


def test_expected_draws_by_hand():
    # two equally likely outcomes, T = 1/3: Z = 2 * 0.5^3 = 0.25.
    assert expected_draws([0.5, 0.5], 1 / 3, early_exit=False) == pytest.approx(3 / 0.25)
    # early exit: 1 + sum p + sum p^2 = 2.5 draws per round.
    assert expected_draws([0.5, 0.5], 1 / 3) == pytest.approx(2.5 / 0.25)
    # T = 1/1.5: n = 1, alpha = 0.5; (1 + sum p^0.5) / sum p^1.5.
    assert expected_draws([0.5, 0.5], 1 / 1.5) == pytest.approx((1 + 2 * 0.5**0.5) / (2 * 0.5**1.5))
    assert expected_draws([0.2, 0.8], 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        expected_draws([0.2, 0.2], 0.5)


def test_temperature_one_returns_the_first_draw():
    outcomes = iter(["a", "b", "c"])
    assert exact_temperature_sample(lambda: next(outcomes), 1.0) == ("a", 1, False)


def test_stage_two_acceptance_is_p_to_the_alpha():
    """A two-outcome P with P(x*) = p: T = 1/(1 + alpha) accepts x* with probability
    p^(1+alpha) / Z. Here exactly: p = 0.3, alpha = 0.5, 40,000 samples, seed 4, 5 standard errors."""
    p, alpha, num = 0.3, 0.5, 40_000
    draw = categorical_draw([p, 1 - p], seed=4)
    rng = random.Random(5)
    hits = sum(exact_temperature_sample(draw, 1 / (1 + alpha), rng=rng)[0] == 0 for _ in range(num))
    want = p ** (1 + alpha) / (p ** (1 + alpha) + (1 - p) ** (1 + alpha))
    assert abs(hits / num - want) < 5 * math.sqrt(want * (1 - want) / num)


def test_budget_exhausted_raises_with_count():
    counter = itertools.count()  # never repeats, so T = 1/2 never accepts
    with pytest.raises(SamplingBudgetExceeded, match="made 50 draws") as info:
        exact_temperature_sample(lambda: next(counter), 0.5, max_attempts=50)
    assert info.value.num_draws == 50


def test_budget_exhausted_fallback_returns_most_frequent_draw():
    cycle = itertools.cycle(["a", "b", "a", "c"])  # pairs (a, b), (a, c): stage 1 never agrees
    result = exact_temperature_sample(lambda: next(cycle), 0.5, max_attempts=41, on_exhausted="fallback")
    assert result == ("a", 41, True)
    assert result.exhausted


def test_budget_counts_stage_two_draws():
    outcomes = itertools.chain(["a"], itertools.repeat("b"))  # candidate "a", then never a match

    class NeverRestart(random.Random):
        def random(self):
            return 0.999

    with pytest.raises(SamplingBudgetExceeded) as info:
        exact_temperature_sample(lambda: next(outcomes), 0.7, max_attempts=7, rng=NeverRestart())
    assert info.value.num_draws == 7


@pytest.mark.parametrize("temperature", [0.0, -0.5, 1.5, math.nan, math.inf])
def test_invalid_temperature_raises(temperature):
    with pytest.raises(ValueError, match=r"temperature must be in \(0, 1\]"):
        exact_temperature_sample(lambda: 0, temperature)
    with pytest.raises(ValueError, match=r"temperature must be in \(0, 1\]"):
        batch_temperature_select(torch.zeros(1, 4, 2, dtype=torch.long), temperature)
    with pytest.raises(ValueError, match=r"temperature must be in \(0, 1\]"):
        expected_draws([1.0], temperature)


def test_invalid_budget_and_mode_raise():
    with pytest.raises(ValueError, match="max_attempts"):
        exact_temperature_sample(lambda: 0, 0.5, max_attempts=0)
    with pytest.raises(ValueError, match="on_exhausted"):
        exact_temperature_sample(lambda: 0, 0.5, on_exhausted="ignore")


# --- batch approximation (Algorithm 2) -------------------------------------------------------------


def letters_to_candidates(letters: str) -> torch.Tensor:
    """One row of K = 2 chunks, one chunk per letter."""
    ids = [ord(c) for c in letters]
    return torch.tensor([[[i, i + 1] for i in ids]])


def test_paper_example():
    """Alg. 2 (paper §6) by hand: T = 0.5, batch {A,C,A,D,B,E,A,F,B,G} -> P(A) = 3/4, P(B) = 1/4."""
    letters = "ACADBEAFBG"
    probs = batch_temperature_probs(letters_to_candidates(letters), 0.5)[0]
    by_letter = Counter()
    for letter, p in zip(letters, probs.tolist()):
        by_letter[letter] += p
    assert by_letter["A"] == pytest.approx(0.75)
    assert by_letter["B"] == pytest.approx(0.25)
    assert sum(by_letter.values()) == pytest.approx(1.0)


def reference_probs(row: list[tuple], temperature: float) -> list[float]:
    """Per-row rule of batch_temperature_probs written with Counter and math.lgamma."""
    inverse = 1 / temperature
    if abs(inverse - round(inverse)) < 1e-9:
        whole, frac = round(inverse), 0.0
    else:
        whole, frac = math.floor(inverse), inverse - math.floor(inverse)
    counts = Counter(row)
    top = max(counts.values())
    order = whole + frac if top >= whole else top + frac
    weights = {
        x: math.exp(math.lgamma(c + 1) - math.lgamma(order + 1) - math.lgamma(c - order + 1))
        for x, c in counts.items()
        if c >= math.floor(order)
    }
    total = sum(weights.values())
    return [weights.get(x, 0.0) / total / counts[x] for x in row]


@pytest.mark.parametrize("temperature", [1.0, 1 / 2, 1 / 3, 1 / 4, 0.7, 0.4])
def test_vectorised_probs_match_per_row_reference(temperature):
    generator = torch.Generator().manual_seed(6)
    candidates = torch.randint(0, 3, (16, 12, 2), generator=generator)  # many repeats per row
    got = batch_temperature_probs(candidates, temperature)
    want = [reference_probs([tuple(c) for c in row.tolist()], temperature) for row in candidates]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_integer_rule_with_binomial_weights():
    # counts: x=4, y=2, z=1 at T = 1/2 -> weights C(4,2)=6, C(2,2)=1, z excluded.
    row = torch.tensor([[[0], [0], [1], [0], [2], [1], [0]]])
    probs = batch_temperature_probs(row, 0.5)[0]
    assert probs[[0, 1, 3, 6]].sum().item() == pytest.approx(6 / 7)
    assert probs[[2, 5]].sum().item() == pytest.approx(1 / 7)
    assert probs[4].item() == 0.0
    # T = 1/5 but the largest count is 4: descend to m = 4, so only x remains.
    assert batch_temperature_probs(row, 0.2)[0][[0, 1, 3, 6]].sum().item() == pytest.approx(1.0)


def test_non_integer_rule_is_continuous_at_integers():
    generator = torch.Generator().manual_seed(7)
    candidates = torch.randint(0, 4, (32, 20, 1), generator=generator)
    for whole in (1, 2, 3):
        at = batch_temperature_probs(candidates, 1 / whole)
        above = batch_temperature_probs(candidates, 1 / (whole + 1e-6))
        below = batch_temperature_probs(candidates, 1 / (whole - 1e-6)) if whole > 1 else at
        torch.testing.assert_close(above, at, atol=1e-4, rtol=0)
        torch.testing.assert_close(below, at, atol=1e-4, rtol=0)


def batch_tv(temperature: float, num_candidates: int, seed: int, repetitions: int = 20_000) -> float:
    """TV between the batch sampler's output law and P^(1/T)/Z, averaged over candidate draws.

    Uses the selection probabilities rather than sampled picks (Rao-Blackwellised), so the only
    noise is from the candidate draws: about 0.001 TV at 20,000 repetitions.
    """
    generator = torch.Generator().manual_seed(seed)
    probs = torch.tensor(PROBS, dtype=torch.float64)
    draws = torch.multinomial(probs.expand(repetitions, len(PROBS)), num_candidates, True, generator=generator)
    weights = batch_temperature_probs(draws.unsqueeze(-1), temperature)  # (R, N)
    law = torch.zeros(len(PROBS), dtype=torch.float64).index_add_(0, draws.flatten(), weights.flatten())
    law /= repetitions
    target = torch.tensor(tempered(PROBS, temperature), dtype=torch.float64)
    return 0.5 * (law - target).abs().sum().item()


@pytest.mark.parametrize("temperature", [1 / 2, 1 / 3, 0.7])
def test_batch_approximation_error_falls_with_batch_size(temperature):
    """Seed 8. Measured TVs at N = 5, 20, 100: T=1/2 0.073, 0.027, 0.006; T=1/3 0.205, 0.077,
    0.020; T=0.7 (non-integer rule) 0.055, 0.009, 0.002. Each step must at least halve the error
    and N = 100 must be within 0.03 of the target."""
    tvs = [batch_tv(temperature, n, seed=8) for n in (5, 20, 100)]
    assert tvs[1] < 0.5 * tvs[0] and tvs[2] < 0.5 * tvs[1], tvs
    assert tvs[2] < 0.03, tvs


def test_select_and_sample_follow_probs():
    """Paper example repeated in 40,000 rows, seed 9: picks land only on A or B, A in 3/4 of rows
    (within 0.01, over 4 standard errors)."""
    letters = "ACADBEAFBG"
    rows = letters_to_candidates(letters).expand(40_000, -1, -1)
    generator = torch.Generator().manual_seed(9)
    picked = batch_temperature_select(rows, 0.5, generator)
    assert picked.shape == (40_000,) and picked.dtype == torch.long
    picked_letters = Counter(letters[i] for i in picked.tolist())
    assert set(picked_letters) == {"A", "B"}
    assert picked_letters["A"] / 40_000 == pytest.approx(0.75, abs=0.01)
    chunks = batch_temperature_sample(rows[:3], 0.5, torch.Generator().manual_seed(0))
    assert chunks.shape == (3, 2)
    assert set(chunks[:, 0].tolist()) <= {ord("A"), ord("B")}


def test_temperature_one_is_uniform():
    candidates = torch.randint(0, 2, (2, 5, 3))
    torch.testing.assert_close(batch_temperature_probs(candidates, 1.0), torch.full((2, 5), 0.2).double())


def test_bad_candidates_raise():
    with pytest.raises(ValueError, match=r"shape \(batch, num_candidates, chunk_size\)"):
        batch_temperature_select(torch.zeros(4, 2, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="integer token ids"):
        batch_temperature_select(torch.zeros(1, 4, 2), 0.5)
    with pytest.raises(ValueError, match="num_candidates=0"):
        batch_temperature_select(torch.zeros(1, 0, 2, dtype=torch.long), 0.5)


def _rows(*rows: list[int]) -> torch.Tensor:
    """Rows of single-token candidates, (B, N, 1)."""
    return torch.tensor(rows, dtype=torch.long).unsqueeze(-1)


@pytest.mark.parametrize(
    ("temperature", "rows", "want"),
    [
        (0.5, ([1, 2, 3, 4], [1, 1, 2, 3]), [1.0, 0.5]),  # all distinct: uniform; a pair: T itself
        (1 / 3, ([1, 1, 2, 3], [1, 1, 1, 2], [5, 6, 7, 8]), [1 / 2, 1 / 3, 1.0]),  # the order drops to 2
        (1 / 2.5, ([1, 1, 2, 3], [1, 2, 3, 4]), [0.4, 1.0]),  # c = 2 >= n = 2: T itself
        (1 / 3.5, ([1, 1, 2, 3],), [1 / 2.5]),  # c = 2 < n = 3: m = c + alpha
        (1.0, ([1, 1, 1, 1],), [1.0]),
    ],
)
def test_effective_temperature_by_hand(temperature, rows, want) -> None:
    got = batch_effective_temperature(_rows(*rows), temperature)
    assert got.tolist() == pytest.approx(want)


@pytest.mark.parametrize("temperature", [0.5, 1 / 3, 0.7])
def test_effective_temperature_one_means_alg2_chose_uniformly(temperature) -> None:
    """Every row reported as T = 1 is one where Alg. 2's probabilities are uniform (the converse need not
    hold: four pairs are sharpened at T = 1/2 and still come out uniform)."""
    candidates = torch.randint(0, 12, (200, 8, 1), generator=torch.Generator().manual_seed(0))
    effective = batch_effective_temperature(candidates, temperature)
    probs = batch_temperature_probs(candidates, temperature)
    uniform = (probs - 1 / 8).abs().max(dim=1).values < 1e-12
    fell_back = effective == 1.0
    assert bool(uniform[fell_back].all())
    assert 0 < int(fell_back.sum()) < 200 and int((~uniform).sum()) > 0  # both cases occur


def test_sampling_stats_count_fallbacks_and_the_mean_temperature() -> None:
    stats = SamplingStats(0.5, "batch")
    for effective in (1.0, 0.5, 1.0, 0.5):
        stats.record(effective)
    assert (stats.steps, stats.fallback_steps, stats.effective_temperature) == (4, 2, 0.75)
    exact = SamplingStats(0.5, "exact")
    exact.record(0.5)
    exact.record(None)  # budget ran out: a fallback, left out of the mean
    assert (exact.steps, exact.fallback_steps, exact.effective_temperature) == (2, 1, 0.5)
    total = SamplingStats.combine([stats, SamplingStats(0.5, "batch")])
    assert total.to_dict() == {
        "sampler": "batch",
        "temperature": 0.5,
        "steps": 4,
        "fallback_steps": 2,
        "effective_temperature": 0.75,
    }
    assert stats.describe(16) == (
        "2 of 4 steps fell back to T = 1 (all candidates differed); effective temperature 0.75 "
        "(asked 0.5, sampler batch, N = 16)"
    )
    assert "--num-samples" in stats.remedy() and "--sampler exact" in stats.remedy()
    plain = SamplingStats(1.0)
    plain.record(1.0)
    assert plain.fallback_steps == 0  # T = 1 asked: nothing to fall back from
    with pytest.raises(ValueError, match="different temperatures"):
        SamplingStats.combine([stats, exact])
