"""The rectified-flow sampler as an SDE, so each denoising step has a Gaussian log-probability (Flow-GRPO).

With ``x_sigma = (1 - sigma) x0 + sigma eps`` and the transformer's velocity ``v = eps - x0``, the
reverse SDE with the ODE's marginals takes, from sigma to sigma' < sigma (dt = sigma' - sigma < 0),

    mean = x + [v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)] dt,    x' = mean + std_t sqrt(-dt) eps',
    std_t = noise_level * sqrt(sigma / (1 - sigma)),

where ``1 - sigma`` uses the second sigma of the schedule when sigma = 1. ``noise_level = 0`` is the
Euler ODE step. Log-probabilities are averaged over latent elements, as Flow-GRPO does, so ratios and
clip ranges do not depend on the latent size.

:func:`cps_step` is the coefficients-preserving sampler (Flow-CPS, Wang & Yu 2025) that Flow-GRPO-Fast
offers beside it: it re-mixes the predicted clean sample and the predicted noise so the next sample
keeps exactly the noise level sigma' of the schedule,

    x' = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) eps_hat + std eps',   std = sigma' sin(noise_level pi / 2),

with ``x0_hat = x - sigma v`` and ``eps_hat = x + (1 - sigma) v``; ``noise_level = 0`` is again Euler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SDEStep:
    sample: torch.Tensor  # x' (B, C, H, W)
    mean: torch.Tensor  # the step's Gaussian mean
    std: torch.Tensor  # (B, 1, 1, 1) its standard deviation std_t sqrt(-dt); 0 for an ODE step
    log_prob: torch.Tensor | None  # (B,) mean over elements of log N(x'; mean, std^2); None for an ODE step


def sde_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise_level: float,
    sigma_below_one: float,
    *,
    next_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """One step from ``sigma`` to ``sigma_next``. ``next_sample`` given: its log-probability under this
    step (the policy-gradient path); otherwise x' is drawn (noise on the CPU from ``generator``).
    ``sigma_below_one``: the schedule's largest sigma below 1, used in place of sigma = 1 in std_t."""
    if not 0 <= sigma_next < sigma <= 1:
        raise ValueError(f"sigmas must decrease within [0, 1], got {sigma} -> {sigma_next}")
    dt = sigma_next - sigma
    compute = torch.promote_types(sample.dtype, torch.float32)
    x, v = sample.to(compute), velocity.to(compute)
    if noise_level == 0:
        mean = x + v * dt
        return SDEStep(mean.to(sample.dtype), mean, torch.zeros(x.shape[0], 1, 1, 1, dtype=compute, device=x.device), None)
    std_t = noise_level * math.sqrt(sigma / (1 - (sigma_below_one if sigma >= 1 else sigma)))
    mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = std_t * math.sqrt(-dt)
    if next_sample is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, compute)
        next_sample = mean + std * noise
    log_prob = gaussian_log_prob(next_sample.detach().to(compute), mean, std)
    return SDEStep(next_sample.to(sample.dtype), mean, torch.full((x.shape[0], 1, 1, 1), std, dtype=compute, device=x.device), log_prob)


def cps_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise_level: float,
    *,
    next_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """One coefficients-preserving step from ``sigma`` to ``sigma_next``; arguments as :func:`sde_step`.
    The last step (sigma' = 0) has no noise to add and is deterministic."""
    if not 0 <= sigma_next < sigma <= 1:
        raise ValueError(f"sigmas must decrease within [0, 1], got {sigma} -> {sigma_next}")
    compute = torch.promote_types(sample.dtype, torch.float32)
    x, v = sample.to(compute), velocity.to(compute)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    clean, noise_estimate = x - sigma * v, x + (1 - sigma) * v
    mean = (1 - sigma_next) * clean + math.sqrt(max(sigma_next**2 - std**2, 0.0)) * noise_estimate
    std_tensor = torch.full((x.shape[0], 1, 1, 1), std, dtype=compute, device=x.device)
    if std == 0:
        return SDEStep(mean.to(sample.dtype), mean, std_tensor, None)
    if next_sample is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, compute)
        next_sample = mean + std * noise
    log_prob = gaussian_log_prob(next_sample.detach().to(compute), mean, std)
    return SDEStep(next_sample.to(sample.dtype), mean, std_tensor, log_prob)


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Per sample: the mean over elements of log N(value; mean, std^2)."""
    elementwise = -((value - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return elementwise.flatten(1).mean(dim=1)


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per sample: KL between two steps with equal std, ``|mean - ref|^2 / (2 std^2)``, averaged over elements."""
    return (((mean - reference_mean) ** 2) / (2 * std**2)).flatten(1).mean(dim=1)
