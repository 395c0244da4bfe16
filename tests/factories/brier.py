"""Exact Brier-n for checking the BrierLM estimators (paper §5): a GPT small enough to enumerate every path.

``assert_unbiased`` is the statistical check of the estimator tests: with fixed seeds a sample mean
must lie within 3 standard errors of the exact value (deterministic, since the seeds are fixed).
"""

from __future__ import annotations

import math

import torch

from calm.models.gpt import GPT

from .models import tiny_gpt

N_MAX = 4
"""BrierLM averages Brier-1 .. Brier-4."""


def brier_gpt() -> GPT:
    """A random 1-layer GPT over 7 ids, seeded 0, in eval mode; its large init (std 0.5) makes the
    next-token distributions peaked, so Brier-2..4 are far from zero. 7^4 paths: exact enumeration is cheap."""
    config = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, max_seq_len=16, init_std=0.5)
    return tiny_gpt(vocab=7, **config).eval()


@torch.no_grad()
def enumerate_exact_brier(model: GPT, seq: list[int]) -> torch.Tensor:
    """(T - N_MAX, N_MAX) exact Brier-n = 2 P(y_1..n) - sum over all V^n paths of P(path)^2."""
    V = model.config.vocab_size
    log_probs = torch.log_softmax(model(torch.tensor([seq])).double(), -1)[0]
    out = torch.zeros(len(seq) - N_MAX, N_MAX, dtype=torch.float64)
    for t in range(len(seq) - N_MAX):
        prefix = seq[: t + 1]
        sq_mass = torch.ones(1, dtype=torch.float64)  # P(path)^2 for every path of the current depth
        paths: list[tuple[int, ...]] = [()]
        log_p_target = 0.0
        for n in range(1, N_MAX + 1):
            batch = torch.tensor([prefix + list(p) for p in paths])
            probs = torch.softmax(model(batch)[:, -1].double(), -1)  # (num_paths, V)
            sq_mass = (sq_mass[:, None] * probs.pow(2)).reshape(-1)
            paths = [p + (x,) for p in paths for x in range(V)]
            log_p_target += float(log_probs[t + n - 1, seq[t + n]])
            out[t, n - 1] = 2 * math.exp(log_p_target) - sq_mass.sum()
    return out


def assert_unbiased(estimates: torch.Tensor, exact: torch.Tensor) -> None:
    """Mean of (estimate - exact) over independent rows is 0 within 3 standard errors, per n."""
    diff = (estimates.double() - exact).reshape(-1, exact.shape[-1])
    mean, se = diff.mean(0), diff.std(0) / math.sqrt(diff.shape[0])
    # a column without sampling noise (Brier-1 of the exact form) must be exact up to rounding
    assert (mean.abs() < 3 * se + 1e-6).all(), f"bias {mean.tolist()} vs 3 SE {(3 * se).tolist()}"
