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

Two conventions, ``likelihood``:

* ``flow_grpo`` (default, what flow_grpo's code computes, so its hyperparameters port unchanged): the
  SDE step's log-probability is the Gaussian density, the CPS step's is ``-mean((x' - mean)^2)`` with
  every constant dropped; the KL to the reference divides ``|mean - mean_ref|^2`` by ``2 std_kl^2`` with
  ``std_kl = std_t`` for the SDE (without the step's ``sqrt(-dt)``) and the step's std for CPS;
* ``gaussian``: both steps' exact Gaussian log-densities, and the KL between the two steps' Gaussians
  (``std_kl`` = the step's std), so an SDE step's KL is flow_grpo's divided by ``|dt|``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SDE_TYPES = ("sde", "cps")
LIKELIHOODS = ("flow_grpo", "gaussian")


@dataclass
class SDEStep:
    sample: torch.Tensor  # x' (B, C, H, W)
    mean: torch.Tensor  # the step's Gaussian mean
    std: torch.Tensor  # (B, 1, 1, 1) its standard deviation; 0 for an ODE step
    log_prob: torch.Tensor | None  # (B,) the step's log-probability of x' (see ``likelihood``); None for an ODE step
    kl_std: torch.Tensor  # (B, 1, 1, 1) the std the KL to the reference divides by (see ``likelihood``)


def _check(sigma: float, sigma_next: float, likelihood: str) -> None:
    if not 0 <= sigma_next < sigma <= 1:
        raise ValueError(f"sigmas must decrease within [0, 1], got {sigma} -> {sigma_next}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood convention {likelihood!r}; choose one of {LIKELIHOODS}")


def _full(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((x.shape[0], 1, 1, 1), value, dtype=x.dtype, device=x.device)


def _draw(mean: torch.Tensor, std: float, next_sample, generator) -> torch.Tensor:
    if next_sample is not None:
        return next_sample.detach().to(mean.dtype)
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
    return mean + std * noise


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
    likelihood: str = "flow_grpo",
) -> SDEStep:
    """One step from ``sigma`` to ``sigma_next``. ``next_sample`` given: its log-probability under this
    step (the policy-gradient path); otherwise x' is drawn (noise on the CPU from ``generator``).
    ``sigma_below_one``: the schedule's largest sigma below 1, used in place of sigma = 1 in std_t."""
    _check(sigma, sigma_next, likelihood)
    dt = sigma_next - sigma
    compute = torch.promote_types(sample.dtype, torch.float32)
    x, v = sample.to(compute), velocity.to(compute)
    if noise_level == 0:
        mean = x + v * dt
        return SDEStep(mean.to(sample.dtype), mean, _full(x, 0.0), None, _full(x, 0.0))
    std_t = noise_level * math.sqrt(sigma / (1 - (sigma_below_one if sigma >= 1 else sigma)))
    mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = std_t * math.sqrt(-dt)
    drawn = _draw(mean, std, next_sample, generator)
    kl_std = std_t if likelihood == "flow_grpo" else std
    return SDEStep(drawn.to(sample.dtype), mean, _full(x, std), gaussian_log_prob(drawn, mean, std), _full(x, kl_std))


def cps_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise_level: float,
    *,
    next_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    likelihood: str = "flow_grpo",
) -> SDEStep:
    """One coefficients-preserving step from ``sigma`` to ``sigma_next``; arguments as :func:`sde_step`.
    The last step (sigma' = 0) has no noise to add and is deterministic."""
    _check(sigma, sigma_next, likelihood)
    compute = torch.promote_types(sample.dtype, torch.float32)
    x, v = sample.to(compute), velocity.to(compute)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    clean, noise_estimate = x - sigma * v, x + (1 - sigma) * v
    mean = (1 - sigma_next) * clean + math.sqrt(max(sigma_next**2 - std**2, 0.0)) * noise_estimate
    if std == 0:
        return SDEStep(mean.to(sample.dtype), mean, _full(x, 0.0), None, _full(x, 0.0))
    drawn = _draw(mean, std, next_sample, generator)
    if likelihood == "flow_grpo":
        log_prob = -((drawn - mean) ** 2).flatten(1).mean(dim=1)
    else:
        log_prob = gaussian_log_prob(drawn, mean, std)
    return SDEStep(drawn.to(sample.dtype), mean, _full(x, std), log_prob, _full(x, std))


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Per sample: the mean over elements of log N(value; mean, std^2)."""
    elementwise = -((value - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return elementwise.flatten(1).mean(dim=1)


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per sample: ``|mean - ref|^2 / (2 std^2)`` averaged over elements (the KL of two Gaussians of equal std)."""
    return (((mean - reference_mean) ** 2) / (2 * std**2)).flatten(1).mean(dim=1)
