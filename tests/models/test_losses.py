"""Tests for calm.models.losses: the energy score and energy loss of paper §4.2 (Eqs. 9-10)."""

import itertools

import pytest
import torch

from calm.models.losses import energy_loss, energy_score, energy_terms


def naive_energy_score(samples: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Double loop straight from the estimator of Eqs. 9-10 (N model samples, M targets per position)."""
    num_samples, num_positions, _ = samples.shape
    num_targets = targets.shape[0]
    scores = []
    for i in range(num_positions):
        diversity = sum(
            torch.linalg.vector_norm(samples[n, i] - samples[k, i]) ** alpha
            for n, k in itertools.permutations(range(num_samples), 2)
        )
        fidelity = sum(
            torch.linalg.vector_norm(samples[n, i] - targets[m, i]) ** alpha
            for n in range(num_samples)
            for m in range(num_targets)
        )
        scores.append(diversity / (num_samples * (num_samples - 1)) - 2 * fidelity / (num_samples * num_targets))
    return torch.stack(scores)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 0.5])
def test_matches_naive_double_loop(alpha):
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64) + 2.0
    targets = torch.randn(6, 3, 5, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(energy_score(samples, targets, alpha), naive_energy_score(samples, targets, alpha))
    torch.testing.assert_close(
        energy_loss(samples, targets, alpha), -naive_energy_score(samples, targets, alpha).mean()
    )


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_gradients_match_naive_double_loop(alpha):
    generator = torch.Generator().manual_seed(1)
    samples = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64).requires_grad_()
    targets = torch.randn(5, 2, 4, generator=generator, dtype=torch.float64).requires_grad_()
    grads = torch.autograd.grad(energy_loss(samples, targets, alpha), (samples, targets))
    reference = torch.autograd.grad(-naive_energy_score(samples, targets, alpha).mean(), (samples, targets))
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want)


def test_gradcheck():
    generator = torch.Generator().manual_seed(2)
    samples = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64).requires_grad_()
    targets = torch.randn(4, 2, 4, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, z: energy_score(x, z, 1.25), (samples, targets))


def test_strictly_proper_on_gaussian():
    """The true distribution must out-score a shifted, a too-narrow and a too-wide model.

    Targets ~ N(0, I_8) at 4000 positions, N=8 model samples and M=100 targets per position
    (the paper's N, M). Seed 0. Measured gaps are about 0.1 with a standard error of the mean score
    of about 0.004, so the required margin of 0.05 is over 10 standard errors.
    """
    generator = torch.Generator().manual_seed(0)
    num_positions, dim = 4000, 8
    targets = torch.randn(100, num_positions, dim, generator=generator)

    def mean_score(shift: float, scale: float) -> float:
        samples = shift + scale * torch.randn(8, num_positions, dim, generator=generator)
        return energy_score(samples, targets).mean().item()

    true = mean_score(0.0, 1.0)
    for name, shift, scale in [("shifted", 0.25, 1.0), ("narrow", 0.0, 0.7), ("wide", 0.0, 1.4)]:
        other = mean_score(shift, scale)
        assert true > other + 0.05, f"{name}: true {true:.4f} vs {other:.4f}"


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5, 2.0])
def test_finite_gradients_with_coincident_points(alpha):
    samples = torch.randn(4, 3, 6)
    samples[1] = samples[0]  # duplicated sample
    targets = torch.randn(5, 3, 6)
    targets[2] = samples[3]  # a target equal to a sample
    samples.requires_grad_()
    loss = energy_loss(samples, targets, alpha)
    (grad,) = torch.autograd.grad(loss, samples)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad).all()


def test_all_samples_identical_gives_zero_diversity_and_finite_gradient():
    samples = torch.ones(8, 2, 3, requires_grad=True)
    targets = torch.ones(4, 2, 3)
    score = energy_score(samples, targets)
    torch.testing.assert_close(score, torch.zeros(2))
    (grad,) = torch.autograd.grad(score.sum(), samples)
    assert torch.isfinite(grad).all()


def test_bfloat16_inputs_are_scored_in_float32():
    generator = torch.Generator().manual_seed(3)
    samples = torch.randn(8, 5, 16, generator=generator).bfloat16()
    targets = torch.randn(20, 5, 16, generator=generator).bfloat16()
    score = energy_score(samples, targets)
    assert score.dtype == torch.float32
    torch.testing.assert_close(score, energy_score(samples.float(), targets.float()))


def test_gradient_accurate_far_from_origin():
    """Latents far from 0 must not cost fp32 gradient accuracy (the loss centres each position).

    Inputs lie on a 1/64 grid near 4096, exactly representable in fp32, so the reference is the
    same computation in fp64 near the origin. Without centring the error is about 1e-4 relative.
    """
    generator = torch.Generator().manual_seed(4)
    samples = (torch.randn(4, 3, 8, generator=generator, dtype=torch.float64) * 64).round() / 64
    targets = (torch.randn(6, 3, 8, generator=generator, dtype=torch.float64) * 64).round() / 64
    far_samples = (samples + 4096).float().requires_grad_()
    (grad_far,) = torch.autograd.grad(energy_loss(far_samples, (targets + 4096).float()), far_samples)
    near_samples = samples.clone().requires_grad_()
    (grad_near,) = torch.autograd.grad(energy_loss(near_samples, targets), near_samples)
    torch.testing.assert_close(grad_far.double(), grad_near, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    ("samples_shape", "targets_shape", "alpha", "message"),
    [
        ((8, 16), (4, 16), 1.0, r"samples must have shape \(N, num_positions, latent_dim\)"),
        ((8, 2, 16), (4, 16), 1.0, r"targets must have shape \(M, num_positions, latent_dim\)"),
        ((8, 2, 16), (4, 3, 16), 1.0, "disagree on"),
        ((8, 2, 16), (4, 2, 8), 1.0, "disagree on"),
        ((1, 2, 16), (4, 2, 16), 1.0, "at least 2 model samples"),
        ((8, 2, 16), (0, 2, 16), 1.0, "M=0"),
        ((8, 2, 16), (4, 2, 16), 0.0, r"alpha must be in \(0, 2\]"),
        ((8, 2, 16), (4, 2, 16), 2.5, r"alpha must be in \(0, 2\]"),
    ],
)
def test_bad_inputs_name_the_problem(samples_shape, targets_shape, alpha, message):
    with pytest.raises(ValueError, match=message):
        energy_score(torch.randn(samples_shape), torch.randn(targets_shape), alpha)


def test_integer_inputs_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        energy_score(torch.ones(2, 1, 3, dtype=torch.long), torch.randn(2, 1, 3))


def test_alpha_two_score_is_an_unbiased_mean_regression():
    """The energy_mean_weight term (alpha = 2): E[score] = -2||a - b||^2 - 2 tr Cov(z), whatever the spread of x."""
    gen = torch.Generator().manual_seed(0)
    dim, P = 6, 4000
    a, b = torch.full((dim,), 0.5, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    expected = -2 * float((a - b).pow(2).sum()) - 2 * dim * 0.3**2
    for spread in (0.1, 2.0):  # the spread of the samples does not enter
        x = a + spread * torch.randn(4, P, dim, generator=gen, dtype=torch.float64)
        z = b + 0.3 * torch.randn(8, P, dim, generator=gen, dtype=torch.float64)
        got = float(energy_score(x, z, alpha=2.0).mean())
        assert got == pytest.approx(expected, abs=0.03 * abs(expected)), spread
    # and its gradient pulls every sample toward the target mean by the same amount: 4 (b - a) / N each
    x = (a + torch.randn(4, P, dim, generator=gen, dtype=torch.float64)).requires_grad_()
    z = b + 0.3 * torch.randn(8, P, dim, generator=gen, dtype=torch.float64)
    energy_loss(x, z, alpha=2.0).backward()
    mean_grad = x.grad.sum(dim=0).mean(dim=0) * P  # d loss / d (shift of all N samples of one position)
    assert torch.allclose(mean_grad, 4 * (a - b), atol=0.05)


@pytest.mark.parametrize("weight", [1.0, 0.7, 0.4])
def test_diversity_weight_below_one_trains_a_sharper_distribution(weight):
    """Known answer (ours): for z ~ N(0, 1) and x = s·ξ, 2E|x − z| − λE|x − x'| is least at s = λ/√(2 − λ²)."""
    gen = torch.Generator().manual_seed(0)
    xi = torch.randn(8, 20000, 1, generator=gen, dtype=torch.float64)
    z = torch.randn(16, 20000, 1, generator=gen, dtype=torch.float64)
    scales = torch.linspace(0.2, 1.6, 57, dtype=torch.float64)
    losses = [-float(energy_score(s * xi, z, diversity_weight=weight).mean()) for s in scales]
    best = float(scales[int(torch.tensor(losses).argmin())])
    assert best == pytest.approx(weight / (2 - weight**2) ** 0.5, abs=0.06)


def test_energy_terms_make_up_the_score():
    gen = torch.Generator().manual_seed(1)
    x, z = torch.randn(4, 3, 5, generator=gen), torch.randn(6, 3, 5, generator=gen)
    diversity, fidelity = energy_terms(x, z, 1.3)
    assert torch.allclose(energy_score(x, z, 1.3), diversity - 2 * fidelity)
    assert torch.allclose(energy_score(x, z, 1.3, diversity_weight=0.5), 0.5 * diversity - 2 * fidelity)
