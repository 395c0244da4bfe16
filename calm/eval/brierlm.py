"""BrierLM: a language-model metric that needs only samples (paper §5).

Why BrierLM exists. Perplexity needs the probability the model assigns to the observed text. CALM
cannot give it: its energy head is an implicit generator (noise in, latent vector out), so P(text)
is intractable. Perplexity is therefore unusable, both to evaluate CALM and to compare it with a
token-level Transformer. Plain sample accuracy is no substitute, because it rewards a model that
collapses onto its mode. The Brier score is a *strictly proper* scoring rule: its expectation is
maximised only by the true distribution, so it rewards calibration, not confidence. Unlike the log
score it can be estimated without bias from **two** model samples:

    Brier(P, y) = 2 P(y) - sum_x P(x)^2  ~=  1{x1 = y} + 1{x2 = y} - 1{x1 = x2},   x1, x2 ~ P.

The first two terms reward putting mass on the truth. The collision term penalises a distribution
that piles its mass on a few outcomes. Any model that can sample, CALM or a token LM, is scored on
the same scale.

Brier-n scores the next n tokens as one outcome, i.e. the cumulative product of per-token matches,
so it measures multi-token coherence. BrierLM is 100 times the geometric mean of Brier-1..4, where
each Brier-n is first averaged over the whole evaluation set. The official ``compute_metrics``
omits the factor 100; we report it as the paper's tables do. Over Transformer training
checkpoints, BrierLM tracks cross-entropy almost linearly (Pearson -0.966, Spearman -0.991; paper
Fig. 3). Caveat: like perplexity, it depends on the evaluation context length
(shaochenze/calm#20), so compare models only at equal context (2048 backbone steps).

This module is pure: estimators are functions of samples, probabilities and targets. It has no
model, device or data code. ``token_lm_brier`` scores any callable that maps ids to logits, which
is how the token baseline and test mock models are evaluated (paper §5's token-level estimator). The
CALM estimator (paper §5 and the authors' code) is just ``brier_two_sample`` on decoded chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""ids (B, L) -> next-token logits (B, L, V); position i predicts token i + 1. Must be causal."""
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(prefixes (B, L) right-padded, lengths (B,)) -> logits (B, V) of the token after each prefix."""


# --------------------------------------------------------------------------------------------
# estimators


def exact_brier(probs: torch.Tensor, target: int) -> float:
    """Brier(P, y) = 2 P(y) - sum_x P(x)^2 for one categorical distribution ``probs`` (V,)."""
    probs = probs.double()
    return float(2 * probs[target] - probs.pow(2).sum())


def brier_two_sample(sample1: torch.Tensor, sample2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Unbiased two-sample estimates of Brier-1..n at each start position (paper §5).

    sample1, sample2: (P, n) token ids of two independent n-token continuations per position.
    target: (P, n) the true next n tokens. Returns (P, n) float: column k-1 estimates Brier-k,
    1{x1[:k] = y[:k]} + 1{x2[:k] = y[:k]} - 1{x1[:k] = x2[:k]}, each value in {-1, 0, 1, 2}.
    """
    if not (sample1.shape == sample2.shape == target.shape):
        raise ValueError(
            f"sample1 {tuple(sample1.shape)}, sample2 {tuple(sample2.shape)} and target "
            f"{tuple(target.shape)} must have the same (positions, n) shape"
        )
    acc1 = (sample1 == target).float().cumprod(dim=-1)
    acc2 = (sample2 == target).float().cumprod(dim=-1)
    collision = (sample1 == sample2).float().cumprod(dim=-1)
    return acc1 + acc2 - collision


def brier_exact_form(prob_target: torch.Tensor, collision: torch.Tensor) -> torch.Tensor:
    """The token-LM low-variance estimate of Brier-1..n (paper §5); returns (P, n).

    prob_target: (P, n). Column j holds P(y_{t+j} | y_{<t+j}), the teacher-forced probability of
        the j-th target token (per step, *not* cumulative). The product of the first k columns is
        the exact P(y_{t..t+k-1}), so ``2 * cumprod`` is the exact accuracy term of Brier-k.
    collision: (P, n). Column k-1 is an unbiased estimate of sum over k-token paths of P(path)^2:
        1{two paths sampled from the model agree on their first k-1 tokens} * sum_x P(x | path)^2,
        where both paths start at the true prefix and the last factor is exact at the shared path.
        Column 0 is exactly sum_x P(x | y_{<t})^2.

    Unbiased because E[1{paths agree} * S(path)] = sum_a P(a)^2 S(a) = sum over paths of
    P(path)^2, where S(a) is the next-step sum of squares after the shared prefix a.
    """
    if prob_target.shape != collision.shape:
        raise ValueError(f"prob_target {tuple(prob_target.shape)} and collision {tuple(collision.shape)} must match")
    return 2 * prob_target.cumprod(dim=-1) - collision


def brierlm(brier_means: Sequence[float]) -> float:
    """BrierLM = 100 * (prod_n Brier-n)^(1/n_max) from eval-set *means* (fractions); 0 if any is <= 0.

    Example (paper Table 5): [0.2181, 0.0688, 0.0259, 0.0125] -> 4.70.
    The official code clips the *product* at 0, so an even number of negative Brier-n (a model
    worse than uniform guessing at those n) yields a positive score; we measured an untrained
    CALM scoring 11.7 that way. The geometric mean is only defined for positive terms, so any
    Brier-n <= 0 makes BrierLM 0 here. Both agree whenever every Brier-n is positive.
    """
    values = [float(b) for b in brier_means]
    if any(v <= 0 for v in values):
        return 0.0
    return 100.0 * math.prod(values) ** (1.0 / len(values))


# --------------------------------------------------------------------------------------------
# token-level driver (mock models, the baseline at small scale)


def _default_step_fn(logits_fn: LogitsFn) -> StepFn:
    def step(prefixes: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        logits = logits_fn(prefixes)  # causal, so the right padding never leaks backwards
        return logits[torch.arange(len(lengths), device=logits.device), lengths - 1]

    return step


@torch.no_grad()
def token_lm_brier(
    model_logits_fn: LogitsFn,
    ids: torch.Tensor,
    n_max: int = 4,
    generator: torch.Generator | None = None,
    mode: str = "exact",
    step_fn: StepFn | None = None,
    rollout_batch_size: int = 32,
) -> torch.Tensor:
    """Brier-1..n_max estimates of a token LM at every start position of one sequence.

    ids: (1, T). Position t (t = 0 .. T - n_max - 1: every position, as the authors' code scores
    them) conditions on ids[0, :t+1] and scores the next n tokens ids[0, t+1 : t+1+n]. Returns
    (T - n_max, n_max) float estimates, one unbiased estimate of Brier-n per position and n.

    mode "exact" is the paper's low-variance form (``brier_exact_form``): exact teacher-forced target
    probabilities and exact sum-of-squares at the end of a sampled shared path.
    mode "two_sample" is the generic estimator (``brier_two_sample``) on two independent
    continuations, the estimator CALM uses.

    Rollouts. A path that has so far reproduced the target has the teacher-forced distribution, so
    it costs nothing. Once a path leaves the target, only the collision term still cares about it.
    While the two paths agree they share one prefix, so one forward serves both. Rows whose
    outcome is already settled are not extended. These shortcuts sample exactly the same joint law
    as two fully independent rollouts.

    ``step_fn`` gives next-token logits for a batch of prefixes. Supply it, e.g. KV-cached, for
    speed. The default calls ``model_logits_fn`` on right-padded prefixes, ``rollout_batch_size``
    rows at a time, which is fine for small models and short sequences.
    """
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must have shape (1, T), got {tuple(ids.shape)}; call once per sequence")
    if mode not in ("exact", "two_sample"):
        raise ValueError(f"mode must be 'exact' or 'two_sample', got {mode!r}")
    seq = ids[0]
    T = seq.shape[0]
    num_pos = T - n_max
    if num_pos < 1:
        raise ValueError(f"a sequence of {T} tokens has no position with {n_max} tokens after it")
    step = step_fn or _default_step_fn(model_logits_fn)
    tf_logits = model_logits_fn(ids)[0, : T - 1].float()  # (T-1, V): row s predicts seq[s+1]
    positions = torch.arange(num_pos, device=seq.device)
    offsets = torch.arange(n_max, device=seq.device)
    targets = seq[positions[:, None] + 1 + offsets]  # (P, n_max)
    rollouts = _Rollouts(seq, tf_logits, step, rollout_batch_size)
    if mode == "exact":
        return _exact_form(rollouts, targets, generator)
    return _two_samples(rollouts, targets, generator)


class _Rollouts:
    """Next-token distributions of a token LM after seq[:t+1] + a sampled path, for start positions t.

    A path that has so far reproduced the target reads the teacher-forced logits ``tf_logits`` (T-1, V),
    row s predicting seq[s+1]; any other path is run through ``step``, ``batch_size`` rows at a time.
    """

    def __init__(self, seq: torch.Tensor, tf_logits: torch.Tensor, step: StepFn, batch_size: int) -> None:
        self.seq, self.tf_logits, self.step, self.batch_size = seq, tf_logits, step, batch_size
        self.device = seq.device

    def teacher_forced(self, rows: torch.Tensor, depth: int) -> torch.Tensor:
        return F.softmax(self.tf_logits[rows + depth], dim=-1)

    def rolled_out(self, rows: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        """Next-token probabilities after seq[:t+1] + paths[i] for t = rows[i]; paths (R, depth)."""
        depth = paths.shape[1]
        out = []
        for start in range(0, len(rows), self.batch_size):
            t = rows[start : start + self.batch_size]
            path = paths[start : start + self.batch_size]
            length = int(t.max()) + 1 + depth
            offset = torch.arange(length, device=self.device)[None] - (t[:, None] + 1)  # (B, L)
            in_path = (offset >= 0) & (offset < depth)
            prefixes = self.seq[:length].expand(len(t), length).clone()
            prefixes[in_path] = path.gather(1, offset.clamp(0, depth - 1))[in_path]
            out.append(F.softmax(self.step(prefixes, t + 1 + depth).float(), dim=-1))
        return torch.cat(out)

    def next_probs(self, rows: torch.Tensor, depth: int, on_target: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        """Distributions at ``depth`` for ``rows``: teacher-forced where the path is the target."""
        probs = torch.empty(len(rows), self.tf_logits.shape[-1], device=self.device)
        hit = on_target[rows]
        if hit.any():
            probs[hit] = self.teacher_forced(rows[hit], depth)
        if (~hit).any():
            probs[~hit] = self.rolled_out(rows[~hit], paths[rows[~hit], :depth])
        return probs


def _exact_form(rollouts: _Rollouts, targets: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mode "exact" of :func:`token_lm_brier`: ``brier_exact_form`` of the teacher-forced target probabilities
    and the exact sums of squares along one sampled path per position, followed while two draws agree."""
    num_pos, n_max = targets.shape
    device, tf_logits = rollouts.device, rollouts.tf_logits
    positions = torch.arange(num_pos, device=device)
    offsets = torch.arange(n_max, device=device)
    lse = tf_logits.logsumexp(-1)
    src = positions[:, None] + offsets  # (P, n_max)
    prob_target = torch.exp(tf_logits[src, targets] - lse[src])
    collision = torch.zeros(num_pos, n_max, device=device)
    path = torch.zeros(num_pos, n_max, dtype=torch.long, device=device)
    on_target = torch.ones(num_pos, dtype=torch.bool, device=device)
    rows = positions
    probs = rollouts.teacher_forced(rows, 0)
    for depth in range(n_max):
        collision[rows, depth] = probs.pow(2).sum(-1)
        if depth == n_max - 1:
            break
        draws = torch.multinomial(probs, 2, replacement=True, generator=generator)  # (R, 2)
        path[rows, depth] = draws[:, 0]
        on_target[rows] &= draws[:, 0] == targets[rows, depth]
        rows = rows[draws[:, 0] == draws[:, 1]]  # only agreeing pairs still collide
        if len(rows) == 0:
            break
        probs = rollouts.next_probs(rows, depth + 1, on_target, path)
    return brier_exact_form(prob_target, collision)


def _two_samples(rollouts: _Rollouts, targets: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Mode "two_sample" of :func:`token_lm_brier`: ``brier_two_sample`` of two continuations per position,
    each extended only while it can still change the estimate."""
    num_pos, n_max = targets.shape
    device = rollouts.device
    positions = torch.arange(num_pos, device=device)
    # -1 / -2 mark tokens that can no longer change the estimate; they match nothing
    sample1 = torch.full((num_pos, n_max), -1, dtype=torch.long, device=device)
    sample2 = torch.full((num_pos, n_max), -2, dtype=torch.long, device=device)
    on1 = torch.ones(num_pos, dtype=torch.bool, device=device)  # path 1 == target so far
    on2 = on1.clone()
    agree = on1.clone()  # path 1 == path 2 so far
    for depth in range(n_max):
        rows = positions[on1 | on2 | agree]
        if len(rows) == 0:
            break
        # the distribution of every live path is teacher-forced, except agreeing paths that left the
        # target, which share one rolled-out prefix
        probs = rollouts.next_probs(rows, depth, on1 | ~agree, sample1)
        draws = torch.multinomial(probs, 2, replacement=True, generator=generator)
        keep1, keep2 = (on1 | agree)[rows], (on2 | agree)[rows]
        sample1[rows[keep1], depth] = draws[keep1, 0]
        sample2[rows[keep2], depth] = draws[keep2, 1]
        on1 &= sample1[:, depth] == targets[:, depth]
        on2 &= sample2[:, depth] == targets[:, depth]
        agree &= sample1[:, depth] == sample2[:, depth]
    return brier_two_sample(sample1, sample2, targets)


# --------------------------------------------------------------------------------------------
# accumulation over an eval set


class BrierAccumulator:
    """Running means of Brier-1..max_n over an eval set, with standard errors for BrierLM.

    ``add`` takes per-position estimates (P, max_n). It keeps float64 sums, sums of cross-products
    and the count, so it can give each Brier-n mean, its i.i.d. standard error, and a delta-method
    standard error of BrierLM that uses the covariance between the n's. Brier-n estimates at one
    position are strongly correlated (a 4-gram match implies a 1-gram match).

    Positions are not independent. Neighbouring positions share context and tokens, and a 4-gram
    window overlaps three others. The i.i.d. standard errors (``clustered=False``) therefore
    underestimate the true uncertainty. Each ``add`` call also counts as one *cluster*, so call it
    once per eval block or document. ``clustered=True`` then gives the cluster-robust (sandwich)
    standard error of the ratio mean, which allows any correlation within a block and needs a
    good number of blocks (say 30 or more) to be reliable. ``summary`` reports both.

    ``state_dict`` / ``load_state_dict`` / ``merge`` combine accumulators across ranks or runs.
    Means and standard errors are fractions; ``summary`` and ``brierlm`` are ×100, like the paper.
    """

    def __init__(self, max_n: int = 4) -> None:
        self.max_n = max_n
        self.count = 0
        self.sum = torch.zeros(max_n, dtype=torch.float64)
        self.sum_outer = torch.zeros(max_n, max_n, dtype=torch.float64)
        self.groups = 0
        self.group_sum_outer = torch.zeros(max_n, max_n, dtype=torch.float64)  # sum_g S_g S_g^T
        self.group_weighted_sum = torch.zeros(max_n, dtype=torch.float64)  # sum_g n_g S_g
        self.group_count_sq = 0.0  # sum_g n_g^2

    def add(self, estimates: torch.Tensor) -> None:
        """Add (P, max_n) per-position estimates of Brier-1..max_n; the call is one cluster."""
        if estimates.ndim != 2 or estimates.shape[1] != self.max_n:
            raise ValueError(f"estimates must have shape (positions, {self.max_n}), got {tuple(estimates.shape)}")
        if estimates.shape[0] == 0:
            return
        x = estimates.detach().to("cpu", torch.float64)
        n = x.shape[0]
        s = x.sum(0)
        self.count += n
        self.sum += s
        self.sum_outer += x.T @ x
        self.groups += 1
        self.group_sum_outer += torch.outer(s, s)
        self.group_weighted_sum += n * s
        self.group_count_sq += float(n) ** 2

    def _mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no estimates were added; call add() before asking for results")
        return self.sum / self.count

    def means(self) -> list[float]:
        """Eval-set mean of Brier-1..max_n, as fractions."""
        return self._mean().tolist()

    def covariance_of_means(self, clustered: bool = False) -> torch.Tensor:
        """(max_n, max_n) estimated covariance of the Brier-n means: i.i.d. positions or clustered."""
        mu = self._mean()
        N = self.count
        if not clustered:
            if N < 2:
                return torch.full((self.max_n, self.max_n), math.nan, dtype=torch.float64)
            cov = (self.sum_outer - N * torch.outer(mu, mu)) / (N - 1)
            return cov / N
        G = self.groups
        if G < 2:
            return torch.full((self.max_n, self.max_n), math.nan, dtype=torch.float64)
        # sum_g (S_g - n_g mu)(S_g - n_g mu)^T, expanded into the accumulated moments
        b = self.group_weighted_sum
        resid = (
            self.group_sum_outer - torch.outer(mu, b) - torch.outer(b, mu) + self.group_count_sq * torch.outer(mu, mu)
        )
        return resid * (G / (G - 1)) / N**2

    def standard_errors(self, clustered: bool = False) -> list[float]:
        """Standard error of each Brier-n mean (fractions)."""
        return self.covariance_of_means(clustered).diagonal().clamp(min=0).sqrt().tolist()

    def brierlm(self) -> float:
        return brierlm(self.means())

    def brierlm_se(self, clustered: bool = False) -> float:
        """Delta-method SE of BrierLM: dBrierLM/db_n = BrierLM / (max_n b_n); NaN if any b_n <= 0."""
        mu = self._mean()
        if bool((mu <= 0).any()):
            return math.nan
        grad = self.brierlm() / (self.max_n * mu)
        var = grad @ self.covariance_of_means(clustered) @ grad
        return math.sqrt(max(float(var), 0.0))

    def summary(self) -> dict[str, Any]:
        """Paper-style numbers: brier1..n and their SEs in percent, BrierLM, its SEs, counts.

        ``*_se`` are cluster-robust (each ``add`` call, one evaluation block, is a cluster) when there
        are at least 10 clusters, since positions within a block are correlated; i.i.d. otherwise.
        ``brierlm_se_iid`` is always the i.i.d. figure, for comparison.

        A standard error that is undefined is None (JSON ``null``), never NaN, and
        ``undefined`` maps its key to the reason: the delta method for BrierLM needs every Brier-n
        > 0 (BrierLM is 0 otherwise), an i.i.d. SE needs 2 positions, a clustered one 2 blocks.
        """
        clustered = self.groups >= 10
        undefined: dict[str, str] = {}
        mu = self.means()

        def defined(key: str, value: float, uses_clusters: bool, of_brierlm: bool) -> float | None:
            if math.isfinite(value):
                return value
            if of_brierlm and min(mu) <= 0:
                undefined[key] = (
                    "BrierLM is 0 because some Brier-n <= 0; its delta-method SE (through log Brier-n) is undefined"
                )
            elif uses_clusters:
                undefined[key] = f"a clustered SE needs at least 2 evaluation blocks, got {self.groups}"
            else:
                undefined[key] = f"an i.i.d. SE needs at least 2 scored positions, got {self.count}"
            return None

        out: dict[str, Any] = {}
        for n, (m, se) in enumerate(zip(mu, self.standard_errors(clustered)), start=1):
            out[f"brier{n}"] = 100 * m
            out[f"brier{n}_se"] = defined(f"brier{n}_se", 100 * se, clustered, False)
        out["brierlm"] = self.brierlm()
        out["brierlm_se"] = defined("brierlm_se", self.brierlm_se(clustered), clustered, True)
        out["brierlm_se_iid"] = defined("brierlm_se_iid", self.brierlm_se(), False, True)
        out["brierlm_se_clustered"] = defined("brierlm_se_clustered", self.brierlm_se(clustered=True), True, True)
        out["se_method"] = "clustered by block" if clustered else "iid positions"
        out["positions"] = self.count
        out["blocks"] = self.groups
        if undefined:
            out["undefined"] = undefined
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_n": self.max_n,
            "count": self.count,
            "sum": self.sum.clone(),
            "sum_outer": self.sum_outer.clone(),
            "groups": self.groups,
            "group_sum_outer": self.group_sum_outer.clone(),
            "group_weighted_sum": self.group_weighted_sum.clone(),
            "group_count_sq": self.group_count_sq,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["max_n"]) != self.max_n:
            raise ValueError(f"state has max_n={state['max_n']} but this accumulator has max_n={self.max_n}")
        self.count = int(state["count"])
        self.groups = int(state["groups"])
        self.group_count_sq = float(state["group_count_sq"])
        for key in ("sum", "sum_outer", "group_sum_outer", "group_weighted_sum"):
            setattr(self, key, torch.as_tensor(state[key], dtype=torch.float64).clone())

    def merge(self, other: BrierAccumulator | dict[str, Any]) -> None:
        """Add another accumulator (or its state_dict) into this one, e.g. from another rank."""
        state = other.state_dict() if isinstance(other, BrierAccumulator) else other
        if int(state["max_n"]) != self.max_n:
            raise ValueError(f"cannot merge max_n={state['max_n']} into max_n={self.max_n}")
        self.count += int(state["count"])
        self.groups += int(state["groups"])
        self.group_count_sq += float(state["group_count_sq"])
        for key in ("sum", "sum_outer", "group_sum_outer", "group_weighted_sum"):
            getattr(self, key).add_(torch.as_tensor(state[key], dtype=torch.float64))


def ratio_of_means(
    a_sums: Sequence[float],
    a_counts: Sequence[int],
    b_sums: Sequence[float],
    b_counts: Sequence[int],
    *,
    paired: bool = True,
) -> tuple[float, float]:
    """(ratio, standard error) of two models' mean Brier-n, mean_a / mean_b, from per-block totals.

    ``a_sums[g]`` is model a's sum of per-position estimates in evaluation block g and ``a_counts[g]``
    its number of scored positions; likewise for b. ``paired``: both models scored the same blocks
    (same tokens, same context), so block g of a and of b share their text. The SE is then the
    cluster-robust (sandwich) delta-method one over blocks, which keeps the covariance between the
    two models on the same text: Var(R) ≈ G/(G−1) · Σ_g ((e_a,g / N_a − R e_b,g / N_b) / m_b)², with
    e_x,g = S_x,g − m_x n_x,g. Unpaired, each mean's clustered variance is taken on its own blocks and
    the two are added as independent. Ours (the paper reports no ratios). Units: the ratio has none;
    the SE is NaN when a model has fewer than 2 blocks. Raises ValueError when b's mean is 0 (no ratio
    exists) or when paired blocks differ in number.
    """
    a, na = np.asarray(a_sums, np.float64), np.asarray(a_counts, np.float64)
    b, nb = np.asarray(b_sums, np.float64), np.asarray(b_counts, np.float64)
    if paired and len(a) != len(b):
        raise ValueError(f"paired blocks must match: {len(a)} blocks against {len(b)}")
    Na, Nb = na.sum(), nb.sum()
    if Na == 0 or Nb == 0:
        raise ValueError("each model needs scored positions for a ratio of means")
    ma, mb = a.sum() / Na, b.sum() / Nb
    if mb == 0:
        raise ValueError("the denominator's mean is 0: the ratio is undefined")
    r = ma / mb
    ea, eb = (a - ma * na) / Na, (b - mb * nb) / Nb
    if paired:
        G = len(a)
        var = G / (G - 1) * float(((ea - r * eb) ** 2).sum()) / mb**2 if G > 1 else math.nan
    else:
        Ga, Gb = len(a), len(b)
        if min(Ga, Gb) < 2:
            var = math.nan
        else:
            var = (Ga / (Ga - 1) * float((ea**2).sum()) + r**2 * Gb / (Gb - 1) * float((eb**2).sum())) / mb**2
    return float(r), math.sqrt(var) if math.isfinite(var) else math.nan
