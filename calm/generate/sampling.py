"""Likelihood-free temperature sampling (CALM paper §6, Algorithms 1-2).

CALM's head defines P(x) over next chunks only implicitly: we can draw x (a K-token chunk: one
head sample decoded by argmax) but cannot evaluate P(x). These functions draw from the
temperature-sharpened distribution P_T(x) = P(x)^(1/T) / Z_T, Z_T = sum_x P(x)^(1/T), using draws
alone, so they are pure functions over a "draw" callable or over a tensor of drawn candidates and
can be tested without a model.

- :func:`exact_temperature_sample`: Algorithm 1 (Theorem 1), an exact rejection sampler for any
  T in (0, 1]; :func:`expected_draws` is its expected cost (Theorem 2).
- :func:`batch_temperature_probs` / :func:`batch_temperature_select` /
  :func:`batch_temperature_sample`: Algorithm 2 (Theorem 3), the batch approximation that the
  official code uses for generation, extended to non-integer 1/T.
- :func:`batch_effective_temperature` and :class:`SamplingStats`: the temperature each step was
  actually sampled at (ours: the paper's algorithms, counted). Alg. 2 falls back towards T = 1
  when its N candidates repeat too rarely, and with all N distinct a step is plain T = 1
  sampling; the stats say how often that happened.

Only T <= 1 is possible: draws can sharpen P but not flatten it without likelihoods.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from calm.models import rng

__all__ = [
    "ExactSample",
    "SamplingBudgetExceeded",
    "SamplingStats",
    "batch_effective_temperature",
    "batch_temperature_choice",
    "exact_temperature_sample",
    "expected_draws",
    "batch_temperature_probs",
    "batch_temperature_select",
    "batch_temperature_sample",
]

# 1/T within this relative distance of an integer counts as that integer (1/(1/3) is not exactly 3).
_INTEGER_SNAP = 1e-9


class SamplingBudgetExceeded(RuntimeError):
    """:func:`exact_temperature_sample` made ``max_attempts`` draws without accepting one."""

    def __init__(self, num_draws: int, temperature: float) -> None:
        self.num_draws = num_draws
        self.temperature = temperature
        super().__init__(
            f"exact temperature sampling at T={temperature:g} made {num_draws} draws without "
            f"accepting a sample; raise max_attempts, use a higher temperature, pass "
            f"on_exhausted='fallback', or use the batch approximation (batch_temperature_sample)"
        )


class ExactSample(NamedTuple):
    """What :func:`exact_temperature_sample` returns."""

    sample: Hashable
    """The accepted draw (or, when the budget ran out with ``on_exhausted="fallback"``, the most frequent one)."""
    num_draws: int
    """Calls of ``draw`` made."""
    exhausted: bool
    """True when the budget ran out and ``sample`` is the fallback, not an exact sample of P_T."""


def _split_inverse_temperature(temperature: float) -> tuple[int, float]:
    """1/T = n + alpha with integer n >= 1 and alpha in [0, 1); rejects T outside (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float in (0, 1]; got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and 0.0 < temperature <= 1.0):
        raise ValueError(
            f"temperature must be in (0, 1]; got {temperature}. Likelihood-free sampling can only "
            f"sharpen the model (P(x)^(1/T) with 1/T >= 1); use temperature=1 for plain sampling"
        )
    inverse = 1.0 / temperature
    nearest = round(inverse)
    if abs(inverse - nearest) <= _INTEGER_SNAP * inverse:
        return int(nearest), 0.0
    whole = math.floor(inverse)
    return whole, inverse - whole


def exact_temperature_sample(
    draw: Callable[[], Hashable],
    temperature: float,
    max_attempts: int = 100_000,
    rng: random.Random | None = None,
    on_exhausted: Literal["raise", "fallback"] = "raise",
    early_exit: bool = True,
) -> ExactSample:
    """Draw one exact sample of P^(1/T) / Z_T from a sampler of P (paper Algorithm 1).

    Write 1/T = n + alpha, n integer, alpha in [0, 1).

    Stage 1: draw n samples; if all are equal, that value is the candidate x*, else restart. The
    candidate is x with probability proportional to P(x)^n. If alpha = 0, return x*.

    Stage 2 (a Bernoulli factory for P(x*)^alpha, after Mendo 2019), starting at i = 1: draw x; if
    x == x*, accept x*; otherwise draw u ~ U(0, 1) and restart from stage 1 if u < alpha / i, else
    i <- i + 1 and draw again. With p = P(x*), q = 1 - p and (b)_k the rising factorial, reaching
    step k + 1 has probability q^k prod_{j<=k}(1 - alpha/j) = q^k (1 - alpha)_k / k!, so

        P(accept) = p sum_k q^k (1 - alpha)_k / k! = p (1 - q)^-(1 - alpha) = p^alpha,

    by the binomial series; Algorithm 1 is therefore exact (Theorem 1), and the output is
    x with probability proportional to P(x)^n P(x)^alpha = P(x)^(1/T). The same series gives
    p^(alpha - 1) expected stage-2 draws, hence Theorem 2 (see :func:`expected_draws`).

    Args:
        draw: returns one sample of P per call; samples must be hashable and compare with ``==``
            (in CALM a tuple of K token ids).
        temperature: T in (0, 1]. T = 1 returns the first draw.
        max_attempts: most calls to ``draw`` in total.
        rng: source of the stage-2 uniforms; a fresh ``random.Random()`` if None.
        on_exhausted: what to do when ``max_attempts`` draws did not yield a sample. "raise"
            raises :class:`SamplingBudgetExceeded` (which carries ``num_draws``). "fallback"
            returns the most frequent draw seen so far (ties go to the one seen first): the
            T -> 0 limit of the batch approximation over the draws made, so it is biased
            towards the mode but always returns.
        early_exit: stop stage 1 at the first draw that differs from the first one. The round is
            lost either way, so the output distribution is unchanged and draws are saved; with
            False, stage 1 always makes n draws, as written in the paper (and in Theorem 2).

    Returns:
        :class:`ExactSample` (sample, number of ``draw`` calls made, whether the budget ran out).
    """
    whole, alpha = _split_inverse_temperature(temperature)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be a positive int (a budget of draw calls); got {max_attempts!r}")
    if on_exhausted not in ("raise", "fallback"):
        raise ValueError(f"on_exhausted must be 'raise' or 'fallback'; got {on_exhausted!r}")
    rng = random.Random() if rng is None else rng
    # the draws, counted only if the budget runs out: hashing a draw can cost more than comparing two
    # (calm.generate.lazy_decode decodes a chunk's tokens only as far as a comparison needs them)
    seen: list[Hashable] | None = [] if on_exhausted == "fallback" else None
    num_draws = 0

    def exhausted() -> ExactSample:
        if seen is None:
            raise SamplingBudgetExceeded(num_draws, temperature)
        return ExactSample(Counter(seen).most_common(1)[0][0], num_draws, True)  # Counter: first seen wins ties

    while True:
        # Stage 1: n i.i.d. draws that must all agree.
        candidate: Hashable = None
        agreed = True
        for k in range(whole):
            if num_draws >= max_attempts:
                return exhausted()
            x = draw()
            num_draws += 1
            if seen is not None:
                seen.append(x)
            if k == 0:
                candidate = x
            elif x != candidate:
                agreed = False
                if early_exit:
                    break
        if not agreed:
            continue
        if alpha == 0.0:
            return ExactSample(candidate, num_draws, False)
        # Stage 2: accept the candidate with probability P(candidate)^alpha.
        step = 1
        while True:
            if num_draws >= max_attempts:
                return exhausted()
            x = draw()
            num_draws += 1
            if seen is not None:
                seen.append(x)
            if x == candidate:
                return ExactSample(candidate, num_draws, False)
            if rng.random() < alpha / step:
                break
            step += 1


def expected_draws(probs: Sequence[float] | Tensor, temperature: float, early_exit: bool = True) -> float:
    """Expected number of ``draw`` calls of :func:`exact_temperature_sample` (paper Theorem 2).

    With 1/T = n + alpha and Z_T = sum_x P(x)^(1/T), the paper's count (``early_exit=False``) is

        E[N] = (n + 1{alpha > 0} sum_x P(x)^(1/T - 1)) / Z_T.

    With ``early_exit=True`` (the sampler's default) stage 1 costs sum_{j=0}^{n-1} sum_x P(x)^j
    draws per round instead of n (the j-th extra draw happens only if the first j agreed).

    Args:
        probs: the probabilities of all outcomes of P (1-D, non-negative, summing to 1).
        temperature: T in (0, 1].
        early_exit: match the sampler's ``early_exit`` flag.
    """
    whole, alpha = _split_inverse_temperature(temperature)
    p = torch.as_tensor(probs, dtype=torch.float64)
    if p.dim() != 1 or p.numel() == 0:
        raise ValueError(f"probs must be a non-empty 1-D sequence of probabilities; got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    total = p.sum().item()
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"probs must sum to 1; got {total:.6g}. Normalise them first")
    p = p[p > 0]
    inverse = whole + alpha
    z_t = p.pow(inverse).sum().item()
    if early_exit:
        stage1 = 1.0 + sum(p.pow(j).sum().item() for j in range(1, whole))
    else:
        stage1 = float(whole)
    stage2 = p.pow(inverse - 1.0).sum().item() if alpha > 0 else 0.0
    return (stage1 + stage2) / z_t


def batch_temperature_probs(candidates: Tensor, temperature: float) -> Tensor:
    """Probability that :func:`batch_temperature_select` returns each candidate (paper Algorithm 2).

    Per row, with c_x the number of candidates equal to tuple x and r = 1/T:

    - Integer r (paper Algorithm 2): for m = r, r-1, ..., 1 the eligible tuples are those with
      c_x >= m, weighted C(c_x, m); the first m with an eligible tuple is used. Since
      E[C(c, m)] = C(N, m) P(x)^m for c ~ Binomial(N, P(x)), the weights estimate P(x)^r (up to
      normalisation) without bias, and the ratio converges to P_T as N grows (Theorem 3).
      Example (T = 1/2): {A,C,A,D,B,E,A,F,B,G} gives A weight 3, B weight 1, so P(A) = 3/4.
    - Non-integer r = n + alpha (this library's extension): weights are the generalised binomial
      C(c, m) = Gamma(c+1) / (Gamma(m+1) Gamma(c-m+1)), positive for c >= floor(m), with
      m = r if some tuple has c >= n, else m = max_x c_x + alpha (descending r -> r-1 -> ... as
      above). C(c, m) ~ c^m / Gamma(m+1) for large c, so the rule is consistent as N -> infinity
      like Theorem 3, though no longer unbiased at finite N. It reduces exactly to Algorithm 2 at
      integer r and is continuous in r: C(n, n + alpha) -> 1 as alpha -> 0 and -> 0 as alpha -> 1.
      (Requiring c >= m instead would drop tuples seen n times the moment r passes n.)
    - T = 1 gives every candidate the same probability 1/N.

    A tuple's weight is spread evenly over its c_x copies, so the returned (B, N) float64
    probabilities sum to 1 per row.

    Args:
        candidates: (B, N, K) integer tensor: B rows of N drawn K-token chunks.
        temperature: T in (0, 1].
    """
    return _alg2(candidates, temperature)[0]


def _alg2(candidates: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Alg. 2's probabilities (B, N) and the temperature each row is effectively sampled at (B,), both
    float64, from one count of equal candidates (see :func:`batch_temperature_probs` and
    :func:`batch_effective_temperature`)."""
    whole, alpha = _split_inverse_temperature(temperature)
    _check_candidates(candidates)
    batch, num_candidates, _ = candidates.shape
    device = candidates.device
    if whole == 1 and alpha == 0.0:
        uniform = torch.full((batch, num_candidates), 1.0 / num_candidates, dtype=torch.float64, device=device)
        return uniform, torch.ones(batch, dtype=torch.float64, device=device)
    counts = _tuple_counts(candidates).to(torch.float64)  # (B, N)
    max_count = counts.max(dim=1, keepdim=True).values  # (B, 1)
    inverse = whole + alpha
    order = torch.where(max_count >= whole, torch.full_like(max_count, inverse), max_count + alpha)  # m
    eligible = counts >= order.floor()
    # log of C(c, m) / c: each copy of a tuple carries 1/c of the tuple's weight. The 1/Gamma(m+1)
    # factor of C(c, m) is common to the row and cancels in the normalisation.
    log_weight = torch.lgamma(counts + 1) - torch.lgamma(counts - order + 1) - counts.log()
    log_weight = torch.where(eligible, log_weight, -math.inf)
    # the order used, as a temperature: T itself, 1/(c + alpha) when lowered, 1 when all candidates differ
    effective = torch.where(max_count >= whole, torch.full_like(order, temperature), 1.0 / order)
    effective = torch.where(max_count <= 1, torch.ones_like(order), effective).squeeze(1)
    return torch.softmax(log_weight, dim=1), effective


def batch_temperature_select(candidates: Tensor, temperature: float, generator: rng.Generators = None) -> Tensor:
    """Pick one candidate per row with the batch approximation of P^(1/T) (paper Algorithm 2).

    See :func:`batch_temperature_probs` for the rule. ``generator`` (on the candidates' device), or one
    per row (:mod:`calm.models.rng`), makes the choice reproducible.

    Args:
        candidates: (B, N, K) integer tensor: B rows of N drawn K-token chunks.
        temperature: T in (0, 1].

    Returns:
        (B,) long tensor of indices into N.
    """
    return batch_temperature_choice(candidates, temperature, generator)[0]


def batch_temperature_choice(
    candidates: Tensor, temperature: float, generator: rng.Generators = None
) -> tuple[Tensor, Tensor]:
    """:func:`batch_temperature_select` and :func:`batch_effective_temperature` from one count of the
    candidates: ((B,) long indices into N, (B,) float64 temperatures)."""
    probs, effective = _alg2(candidates, temperature)  # (B, N), (B,)
    if probs.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=candidates.device), effective
    return rng.multinomial(probs, generator), effective


def batch_temperature_sample(candidates: Tensor, temperature: float, generator: rng.Generators = None) -> Tensor:
    """Like :func:`batch_temperature_select` but returns the chosen (B, K) chunks themselves."""
    index = batch_temperature_select(candidates, temperature, generator)  # (B,)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), index]


def batch_effective_temperature(candidates: Tensor, temperature: float) -> Tensor:
    """The temperature :func:`batch_temperature_select` actually samples each row at (B,) float64.

    With 1/T = n + alpha and c the largest number of equal candidates in the row (see
    :func:`batch_temperature_probs`): T itself when c >= n; 1/(c + alpha) when 1 < c < n (the order
    lowered to what the counts allow); 1 when c = 1, since with all N candidates distinct every
    weight is equal and the choice is uniform, plain T = 1 sampling (the usual case for a model that
    is not peaked when N is small). Ours, a description of paper Alg. 2, not part of it.

    Args:
        candidates: (B, N, K) integer tensor: B rows of N drawn K-token chunks.
        temperature: T in (0, 1].
    """
    return _alg2(candidates, temperature)[1]


@dataclass
class SamplingStats:
    """How often likelihood-free sampling met the temperature asked, over one or more continuations.

    Counted per generated chunk (a step of one continuation). A step *falls back* when it was not
    sampled at the temperature asked for reasons of budget: for the batch approximation (Alg. 2),
    when all N candidates differed, so the step was plain T = 1 sampling (more candidates,
    ``num_samples``, or the exact sampler are the remedies); for the exact sampler (Alg. 1), when
    its draw budget ran out and it returned the most frequent draw. ``effective_temperature`` is the
    mean over steps of the temperature each was sampled at (:func:`batch_effective_temperature`; T
    for an exact step), exhausted exact steps left out. At T = 1 nothing falls back. Ours: the paper
    reports neither figure.
    """

    temperature: float
    """The temperature asked for."""
    sampler: str = "batch"
    """``"batch"`` (Alg. 2) or ``"exact"`` (Alg. 1)."""
    steps: int = 0
    """Chunks generated."""
    fallback_steps: int = 0
    """Chunks that fell back (see the class docstring)."""
    temperature_sum: float = 0.0
    """Sum of the effective temperatures of the steps that have one."""
    measured_steps: int = 0
    """Steps with an effective temperature (all but the exact sampler's exhausted ones)."""

    def record(self, effective: float | None) -> None:
        """Count one step sampled at ``effective`` (None: an exact step whose budget ran out)."""
        self.steps += 1
        if effective is None:
            self.fallback_steps += 1
            return
        self.temperature_sum += effective
        self.measured_steps += 1
        if self.temperature < 1.0 and effective == 1.0:
            self.fallback_steps += 1

    @property
    def effective_temperature(self) -> float | None:
        """Mean temperature actually sampled at; None before any measured step."""
        return self.temperature_sum / self.measured_steps if self.measured_steps else None

    @property
    def fallback_fraction(self) -> float:
        return self.fallback_steps / self.steps if self.steps else 0.0

    @classmethod
    def combine(cls, parts: Iterable[SamplingStats]) -> SamplingStats:
        """One total over several continuations (which must share temperature and sampler)."""
        parts = list(parts)
        if not parts:
            raise ValueError("combine needs at least one SamplingStats")
        keys = {(p.temperature, p.sampler) for p in parts}
        if len(keys) != 1:
            raise ValueError(f"cannot combine stats of different temperatures or samplers: {sorted(keys)}")
        total = cls(parts[0].temperature, parts[0].sampler)
        for p in parts:
            total.steps += p.steps
            total.fallback_steps += p.fallback_steps
            total.temperature_sum += p.temperature_sum
            total.measured_steps += p.measured_steps
        return total

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the server's ``usage.sampling``)."""
        effective = self.effective_temperature
        return {
            "sampler": self.sampler,
            "temperature": self.temperature,
            "steps": self.steps,
            "fallback_steps": self.fallback_steps,
            "effective_temperature": None if effective is None else round(effective, 6),
        }

    def describe(self, num_samples: int | None = None) -> str:
        """One line for a person, e.g. ``12 of 16 steps fell back to T = 1 ...``."""
        effective = self.effective_temperature
        mean = "n/a" if effective is None else f"{effective:.3g}"
        if self.sampler == "exact":
            what = "ran out of draws (most frequent draw returned)"
        else:
            what = "fell back to T = 1 (all candidates differed)"
        n = f", N = {num_samples}" if num_samples is not None and self.sampler == "batch" else ""
        return (
            f"{self.fallback_steps} of {self.steps} steps {what}; effective temperature {mean} "
            f"(asked {self.temperature:g}, sampler {self.sampler}{n})"
        )

    def remedy(self) -> str:
        """What to change when most steps fell back."""
        if self.sampler == "exact":
            return "use a higher temperature (the exact sampler's cost grows as T falls) or the batch sampler"
        return "draw more candidates (--num-samples, e.g. 4x as many) or use the exact sampler (--sampler exact)"


def _check_candidates(candidates: Tensor) -> None:
    if not isinstance(candidates, Tensor):
        raise TypeError(f"candidates must be a torch.Tensor; got {type(candidates).__name__}")
    if candidates.dim() != 3:
        raise ValueError(
            f"candidates must have shape (batch, num_candidates, chunk_size); got shape "
            f"{tuple(candidates.shape)}. Add a chunk_size dim of 1 for single tokens"
        )
    if candidates.is_floating_point() or candidates.is_complex():
        raise ValueError(
            f"candidates must be integer token ids; got dtype {candidates.dtype}. Decode head "
            f"samples to tokens (argmax) first"
        )
    if candidates.shape[1] < 1:
        raise ValueError("candidates has num_candidates=0; draw at least one candidate per row")


def _tuple_counts(candidates: Tensor) -> Tensor:
    """(B, N, K) -> (B, N): how many candidates in the same row equal each candidate's K-tuple."""
    batch, num_candidates, chunk_size = candidates.shape
    # Lexicographic sort of each row's tuples: stable sorts by the last column first (LSD radix).
    order = torch.arange(num_candidates, device=candidates.device).expand(batch, num_candidates)
    for k in reversed(range(chunk_size)):
        column = candidates[:, :, k].gather(1, order)
        order = order.gather(1, torch.sort(column, dim=1, stable=True).indices)
    ordered = candidates.gather(1, order.unsqueeze(-1).expand(batch, num_candidates, chunk_size))
    starts = torch.ones(batch, num_candidates, dtype=torch.bool, device=candidates.device)
    starts[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).any(dim=-1)
    group = starts.cumsum(dim=1) - 1  # (B, N) group id of each sorted position
    group_size = torch.zeros_like(group).scatter_add_(1, group, torch.ones_like(group))
    return torch.empty_like(group).scatter_(1, order, group_size.gather(1, group))
