"""CALM's generative heads: h -> samples of the next chunk's latent (paper §4.2; Figs. 8-9).

Every head offers the same two calls, so generation, both temperature samplers, BrierLM and
checkpoints never need to know which head a model has:

- ``sample(h, num_samples, generator)``: h (..., d) -> (num_samples, ..., l) latents, independent
  samples per row of h. ``generator`` may be one generator per row of h (B, d): each row then draws
  exactly what it draws alone (``calm.models.rng``; continuous batching in ``calm serve``).
- ``loss(h, mu, std, generator)``: h (P, d) and the frozen encoder's posterior μ, σ (P, l) of the
  target chunks -> (scalar loss, metrics).

``passes_per_sample(config)`` is the number of head forward passes one sample costs (``calm.models.flops``).

**Energy** (paper §4.2): uniform noise and h go through ``head_blocks`` residual MLP blocks
to a latent in one pass; the loss is the energy score (Eqs. 9-10) of N = ``num_samples`` head samples
against M = ``num_target_samples`` posterior samples.

**Flow matching** (the paper's head ablation, Figs. 8-9): a velocity network v(x_t, t, h).
Training: t ~ U(0, 1), x₀ ~ N(0, I), z ~ posterior, x_t = (1 − t)x₀ + t·z, MSE to the velocity
z − x₀ (h repeated N times, one posterior sample each). Sampling integrates dx/dt = v from t = 0
to 1 with the midpoint rule in ``flow_steps`` steps of two passes each (the paper: decent at 2
steps, near-optimal at 4; its "steps" may count passes, see
docs/guides/experiments.md#flow-and-diffusion-heads).

**Diffusion** (the same ablation): a noise-prediction network ε(x_t, t, h) over the IDDPM cosine schedule with
``diffusion_train_steps`` = 1000 steps. Training: t uniform over the steps, x_t = √ᾱ_t z +
√(1 − ᾱ_t) ε, MSE to ε; the network's output is read as v and turned into ε̂ (see
``DiffusionHead.predict_noise`` for why). Sampling: ancestral DDPM over ``diffusion_steps`` = 100
evenly respaced steps. Choice (documented deviation): the official head also learns σ with the IDDPM variational
bound; here the reverse variance is fixed to the posterior variance β̃ (IDDPM's "fixed small"),
so the loss is the plain ε-MSE.

**Network** (choice, documented deviation): flow and diffusion use the energy head's MLP blocks
(§4.2) rather than the official MAR-style adaLN ResBlocks, so the three heads differ only in their
objective and sampler: input Linear(l→d) of x_t (no LayerNorm, which would erase its scale),
condition c = LayerNorm(Linear(h)) + MLP(sinusoidal(t·1000)), the blocks, and the same
zero-initialised output layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from calm.config import CALMConfig, ConfigError
from calm.models import rng
from calm.models.losses import energy_terms


class MLPBlock(nn.Module):
    """x + down(silu(gate) ⊙ up), with (gate, up) from an MLP over [LN(x); c]; about 6d² params."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(2 * d, d)
        self.fc2 = nn.Linear(d, d)
        self.fc3 = nn.Linear(d, 2 * d)
        self.down = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        u = torch.cat([self.norm(x), c], dim=-1)
        gate, up = self.fc3(F.silu(self.fc2(F.silu(self.fc1(u))))).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class _BlockStack(nn.Module):
    """The shared trunk: ``head_blocks`` MLP blocks, then LayerNorm → Linear(d→d) → SiLU → Linear(d→l)."""

    def _build_trunk(self, config: CALMConfig) -> None:
        # registered after each head's input layers: ``init_weights`` draws in registration order,
        # and the energy head keeps the draw order (so the initial weights) of earlier versions
        d, eps = config.hidden_size, config.rms_norm_eps
        self.blocks = nn.ModuleList(MLPBlock(d, eps) for _ in range(config.head_blocks))
        self.final_norm = nn.LayerNorm(d, eps=eps)
        self.final_fc = nn.Linear(d, d)
        self.final_out = nn.Linear(d, config.latent_size)

    def zero_init_output(self) -> None:
        nn.init.zeros_(self.final_out.weight)
        nn.init.zeros_(self.final_out.bias)

    def trunk(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c)
        return self.final_out(F.silu(self.final_fc(self.final_norm(x))))


def posterior_samples(mu: torch.Tensor, std: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """n samples μ + σ·ξ, ξ ~ N(0, I): (P, l) -> (n, P, l): the energy loss's targets (paper Eq. 10)."""
    xi = torch.randn((n, *mu.shape), device=mu.device, dtype=mu.dtype, generator=generator)
    return mu + std * xi


@torch.no_grad()
def sample_distance(samples: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mean distance of a head sample (N, P, l) to the posterior mean μ (P, l): a readable progress signal."""
    return (samples - mu).norm(dim=-1).mean()


class EnergyHead(_BlockStack):
    """One-step stochastic generator: (h, uniform noise) -> a latent vector (paper §4.2)."""

    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.config = config
        self.noise_size = config.noise_size
        self.noise_embd = nn.Linear(config.noise_size, d)
        self.noise_norm = nn.LayerNorm(d, eps=eps)
        self.hidden_embd = nn.Linear(d, d)
        self.hidden_norm = nn.LayerNorm(d, eps=eps)
        self._build_trunk(config)

    @staticmethod
    def passes_per_sample(config: CALMConfig) -> int:
        return 1

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """h (..., d), noise (..., noise_size) -> latent (..., l)."""
        return self.trunk(self.noise_norm(self.noise_embd(noise)), self.hidden_norm(self.hidden_embd(h)))

    def sample(self, h: torch.Tensor, num_samples: int, generator: rng.Generators = None) -> torch.Tensor:
        """Draw ``num_samples`` latents per row of h: (..., d) -> (num_samples, ..., l)."""
        hs = h.unsqueeze(0).expand(num_samples, *h.shape)
        noise = rng.draw(torch.rand, (num_samples, *h.shape[:-1], self.noise_size), generator, h.device).sub_(0.5)
        return self(hs, noise.to(h.dtype))

    def loss(
        self, h: torch.Tensor, mu: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """−energy score of N head samples against M posterior samples, mean over the P positions (Eqs. 9-10)."""
        targets = posterior_samples(mu, std, self.config.num_target_samples, generator)  # (M, P, l)
        samples = self.sample(h, self.config.num_samples, generator).float()  # (N, P, l)
        return self.energy_loss(samples, targets, mu)

    def energy_loss(
        self, samples: torch.Tensor, targets: torch.Tensor, mu: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The energy loss (paper Eqs. 9-10) of head samples (N, P, l), fp32, against posterior samples (M, P, l)
        of means μ (P, l): 2·fidelity − diversity, averaged over the P positions, with its metrics."""
        diversity, fidelity = energy_terms(samples, targets, self.config.energy_alpha)  # (P,) each
        loss = (2.0 * fidelity - diversity).mean()
        return loss, {"energy_loss": loss.detach(), "sample_dist": sample_distance(samples, mu)}


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (cos, sin) of (possibly fractional) timesteps t (...) -> (..., dim), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _ConditionalNet(_BlockStack):
    """f(x_t, t, h) -> (..., l) on the MLP blocks; t on the 0..1000 scale (flow: t·1000, diffusion: index)."""

    TIME_DIM = 256

    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.config = config
        # no LayerNorm on x_t: its scale carries the noise level, which ε-prediction needs
        self.latent_embd = nn.Linear(config.latent_size, d)
        self.hidden_embd = nn.Linear(d, d)
        self.hidden_norm = nn.LayerNorm(d, eps=eps)
        self.time_fc1 = nn.Linear(self.TIME_DIM, d)
        self.time_fc2 = nn.Linear(d, d)
        self._build_trunk(config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """x (..., l), t (...) on the 0..1000 scale, h (..., d) -> (..., l)."""
        temb = timestep_embedding(t, self.TIME_DIM).to(h.dtype)
        c = self.hidden_norm(self.hidden_embd(h)) + self.time_fc2(F.silu(self.time_fc1(temb)))
        return self.trunk(self.latent_embd(x.to(h.dtype)), c)

    def _replicate(self, h: torch.Tensor, num_samples: int) -> torch.Tensor:
        return h.unsqueeze(0).expand(num_samples, *h.shape)

    def _start(self, h: torch.Tensor, num_samples: int, generator: rng.Generators) -> tuple[torch.Tensor, torch.Tensor]:
        """The samplers' start: h replicated (num_samples, ..., d) and x ~ N(0, I) (num_samples, ..., l)."""
        hs = self._replicate(h, num_samples)
        return hs, rng.draw(torch.randn, (*hs.shape[:-1], self.config.latent_size), generator, h.device)


class FlowHead(_ConditionalNet):
    """Flow matching (rectified-flow path), sampled with the midpoint rule in ``flow_steps`` steps."""

    @staticmethod
    def passes_per_sample(config: CALMConfig) -> int:
        return 2 * config.flow_steps

    def sample(
        self,
        h: torch.Tensor,
        num_samples: int,
        generator: rng.Generators = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Integrate dx/dt = v(x, t, h) from x₀ ~ N(0, I): (..., d) -> (num_samples, ..., l).

        ``steps`` (default ``config.flow_steps``, read at call time so a generation-time change of
        the config applies) midpoint steps, two network passes each.
        """
        steps = self.config.flow_steps if steps is None else steps
        if steps < 1:
            raise ValueError(f"flow sampling needs >= 1 step, got {steps}")
        hs, x = self._start(h, num_samples, generator)
        dt = 1.0 / steps
        for i in range(steps):
            t = torch.full(hs.shape[:-1], i * dt, device=h.device)
            v = self(x, t * 1000, hs).float()
            x_mid = x + 0.5 * dt * v
            v = self(x_mid, (t + 0.5 * dt) * 1000, hs).float()
            x = x + dt * v
        return x.to(h.dtype)

    def loss(
        self, h: torch.Tensor, mu: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSE between v(x_t, t, h) and z − x₀, h repeated N = ``num_samples`` times (Figs. 8-9)."""
        n = self.config.num_samples
        z = posterior_samples(mu, std, n, generator)  # (N, P, l)
        x0 = torch.randn(z.shape, device=z.device, generator=generator)
        t = torch.rand(z.shape[:-1], device=z.device, generator=generator)  # (N, P)
        x_t = (1 - t[..., None]) * x0 + t[..., None] * z
        v = self(x_t, t * 1000, self._replicate(h, n)).float()
        loss = F.mse_loss(v, z - x0)
        with torch.no_grad():
            # the one-step estimate of the endpoint, x_t + (1 − t)·v, against the posterior mean
            dist = (x_t + (1 - t[..., None]) * v - mu).norm(dim=-1).mean()
        return loss, {"flow_loss": loss.detach(), "sample_dist": dist}


def cosine_alphas_cumprod(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t, t = 1..T, of the IDDPM cosine schedule (Nichol & Dhariwal 2021, Eq. 17), fp64, shape (T,).

    ᾱ(t) = f(t)/f(0) with f(t) = cos²((t/T + s)/(1 + s)·π/2); each β_t = 1 − ᾱ_t/ᾱ_{t−1} is clipped
    at ``max_beta`` as IDDPM does, so ᾱ_T > 0.
    """
    f = torch.cos((torch.arange(num_steps + 1, dtype=torch.float64) / num_steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def respaced_steps(num_train_steps: int, num_steps: int) -> list[int]:
    """``num_steps`` training-step indices (0-based, increasing, last = T − 1), evenly strided as IDDPM's
    ``space_timesteps(T, [num_steps])``."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"diffusion sampling steps must be in 1..{num_train_steps}, got {num_steps}")
    if num_steps == 1:
        return [num_train_steps - 1]
    stride = (num_train_steps - 1) / (num_steps - 1)
    return [round(i * stride) for i in range(num_steps)]


class DiffusionHead(_ConditionalNet):
    """ε-prediction over the cosine schedule; ancestral sampling on ``diffusion_steps`` respaced steps."""

    def __init__(self, config: CALMConfig) -> None:
        super().__init__(config)
        self.register_buffer("alphas_cumprod", None, persistent=False)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the noise schedule, which no checkpoint holds (see ``Backbone.init_buffers``)."""
        schedule = cosine_alphas_cumprod(self.config.diffusion_train_steps).float()
        self.alphas_cumprod = schedule if device is None else schedule.to(device)

    @staticmethod
    def passes_per_sample(config: CALMConfig) -> int:
        return config.diffusion_steps

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """ε̂ = √ᾱ_t·f(x_t, t, h) + √(1 − ᾱ_t)·x_t, fp32: x_t (..., l), t (...) step indices, h (..., d).

        The network f predicts v = √ᾱ ε − √(1 − ᾱ) z (Salimans & Ho 2022) and ε̂ follows from it;
        the objective stays the ε-MSE. Why: near the end of the clipped cosine schedule ᾱ ≈ 1e-7,
        where x̂₀ = (x_t − √(1 − ᾱ) ε̂)/√ᾱ amplifies any error of a directly predicted ε ~3000-fold
        and the first sampling step throws x far off the data (measured: next-chunk exact match 2%
        on the learnability corpus with a direct ε output, 98% with this one).
        """
        a = self.alphas_cumprod[t][..., None]
        return a.sqrt() * self(x_t, t, h).float() + (1 - a).sqrt() * x_t.float()

    def loss(
        self, h: torch.Tensor, mu: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """MSE between ε(x_t, t, h) and ε, h repeated N = ``num_samples`` times (Figs. 8-9)."""
        n, T = self.config.num_samples, self.config.diffusion_train_steps
        z = posterior_samples(mu, std, n, generator)  # (N, P, l)
        eps = torch.randn(z.shape, device=z.device, generator=generator)
        t = torch.randint(0, T, z.shape[:-1], device=z.device, generator=generator)  # (N, P)
        a = self.alphas_cumprod[t][..., None]
        x_t = a.sqrt() * z + (1 - a).sqrt() * eps
        pred = self.predict_noise(x_t, t, self._replicate(h, n))
        loss = F.mse_loss(pred, eps)
        with torch.no_grad():
            dist = ((x_t - (1 - a).sqrt() * pred) / a.sqrt() - mu).norm(dim=-1).mean()  # x̂₀ vs μ
        return loss, {"diffusion_loss": loss.detach(), "sample_dist": dist}

    def sample(
        self,
        h: torch.Tensor,
        num_samples: int,
        generator: rng.Generators = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T ~ N(0, I): (..., d) -> (num_samples, ..., l).

        ``steps`` (default ``config.diffusion_steps``, read at call time) respaced steps, one pass
        each. Respacing keeps ᾱ at the chosen steps and recomputes β_i = 1 − ᾱ_i/ᾱ_{i−1}; the
        reverse variance is the posterior's β̃_i = β_i(1 − ᾱ_{i−1})/(1 − ᾱ_i), no noise at the end.
        """
        steps = self.config.diffusion_steps if steps is None else steps
        index = respaced_steps(self.config.diffusion_train_steps, steps)
        ab = cosine_alphas_cumprod(self.config.diffusion_train_steps)[index]  # fp64 on the CPU: exact coefficients
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        hs, x = self._start(h, num_samples, generator)
        for i in reversed(range(steps)):
            t = torch.full(hs.shape[:-1], index[i], device=h.device)
            eps = self.predict_noise(x, t, hs)
            a, a_prev = float(ab[i]), float(ab_prev[i])
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            beta = 1 - a / a_prev
            # posterior mean of q(x_{i-1} | x_i, x̂₀) (DDPM Eq. 7)
            x = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x
            if i > 0:
                var = beta * (1 - a_prev) / (1 - a)
                x = x + math.sqrt(var) * rng.draw(torch.randn, tuple(x.shape), generator, x.device)
        return x.to(h.dtype)


HEADS: dict[str, type[nn.Module]] = {"energy": EnergyHead, "flow": FlowHead, "diffusion": DiffusionHead}
"""``CALMConfig.head`` -> head class."""


def build_head(config: CALMConfig) -> nn.Module:
    """The paper's head named by ``config.head``: energy | flow | diffusion."""
    return HEADS[config.head](config)


def with_sampling_steps(config: CALMConfig, steps: int) -> CALMConfig:
    """A copy of ``config`` whose flow (``flow_steps``) or diffusion (``diffusion_steps``) head samples in
    ``steps`` steps (paper Figs. 8-9 vary them); ``config`` itself is left as it is.

    The heads read their step count from their config at every ``sample`` call, so giving a loaded model
    the new config (its own and its head's: ``model.config = model.head.config = ...``) applies it at once
    (``calm generate --head-steps``, ``calm eval --head-steps``). Raises ``ConfigError`` (a ValueError) for
    the energy head, which has no steps, or for an invalid count.
    """
    if config.head == "energy":
        raise ConfigError(
            "the energy head draws a sample in one pass; sampling steps apply to flow and diffusion heads"
        )
    new = dataclasses.replace(config, **{f"{config.head}_steps": steps})
    new.validate()
    return new


def noise_driven_sampler(head: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(h (..., d), noise (..., n)) -> latent (..., l)``, one sample per row, fixed by ``noise``.

    For callers that need common random numbers across heads (``calm.eval.diagnostics``: the same noise
    with a context's own and a shuffled hidden state). The energy head is such a function already
    (its forward). Flow and diffusion draw Gaussians inside their samplers, so for them the noise
    tensor's bytes seed a generator for ``sample``: equal noise (and shapes) gives exactly the same
    draws, different noise independent ones.
    """
    if isinstance(head, EnergyHead):
        return head

    def sample(h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        digest = hashlib.sha256(noise.detach().float().cpu().numpy().tobytes()).digest()
        generator = torch.Generator(device=h.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return head.sample(h, 1, generator)[0]

    return sample
