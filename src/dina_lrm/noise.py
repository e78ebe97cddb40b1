"""Rectified-flow noising on the backbone's own sigma table.

``x_sigma = (1 - sigma) * x0 + sigma * eps``, with sigma snapped to the nearest entry of the
backbone scheduler's training table (``FlowMatchEulerDiscreteScheduler``, the model's shift,
1000 steps) and the timestep fed to the backbone taken from the same entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dina_lrm.config import IMAGE_U, LATENT_U, SAMPLING_SCHEMES



class SigmaTable:
    """The scheduler's training sigmas and their timesteps, with nearest-entry snapping."""

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        self.sigmas = sigmas.float()
        self.timesteps = timesteps.float()

    @classmethod
    def from_scheduler(cls, scheduler_or_config) -> SigmaTable:
        """Build from a scheduler (or its config) as a fresh scheduler has it: no ``set_timesteps``."""
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        fresh = FlowMatchEulerDiscreteScheduler.from_config(config)
        return cls(fresh.sigmas[: len(fresh.timesteps)], fresh.timesteps)

    @classmethod
    def from_shift(cls, shift: float = 3.0, num_train_timesteps: int = 1000) -> SigmaTable:
        return cls.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift=shift))

    def snap(self, u: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest table entry to each target ``u``: returns (sigma, timestep), shaped like ``u``."""
        u = check_noise_levels(u)
        sigmas = self.sigmas.to(u.device)
        index = (sigmas.view(*([1] * u.dim()), -1) - u.unsqueeze(-1)).abs().argmin(dim=-1)
        return sigmas[index], self.timesteps.to(u.device)[index]


def default_u(inputs: str) -> float:
    """The default noise level for ``inputs``: ``"latents"`` or ``"images"``."""
    return {"latents": LATENT_U, "images": IMAGE_U}[inputs]


def check_noise_levels(u: torch.Tensor | float | list[float]) -> torch.Tensor:
    """``u`` as a float tensor; a ValueError unless every level is finite and in [0, 1]."""
    u = torch.as_tensor(u, dtype=torch.float32)
    if not torch.isfinite(u).all() or (u < 0).any() or (u > 1).any():
        raise ValueError(f"noise levels must lie in [0, 1], got {u.flatten().tolist()}")
    return u


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * noise``; ``sigma`` is per sample (B,) or broadcastable."""
    compute = torch.promote_types(x0.dtype, torch.float32)  # at least float32, float64 stays float64
    sigma = torch.as_tensor(sigma, device=x0.device, dtype=compute)
    if sigma.dim() == 1:
        sigma = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return ((1.0 - sigma) * x0.to(compute) + sigma * noise.to(compute)).to(x0.dtype)


@dataclass
class NoiseSampler:
    """Draws training targets u in (0, 1).

    uniform: U(0,1); logit_normal: sigmoid(N(logit_mean, logit_std)); mode: SD3's mode sampling
    with ``mode_scale``; beta: Beta(beta_a, beta_b); power: U^power (power > 1 favours low noise);
    constant: always ``value``.
    """

    scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    beta_a: float = 1.0
    beta_b: float = 1.0
    power: float = 1.0
    value: float = 0.5

    def __post_init__(self):
        if self.scheme not in SAMPLING_SCHEMES:
            raise ValueError(f"unknown timestep sampling scheme {self.scheme!r}; choose one of {SAMPLING_SCHEMES}")

    @classmethod
    def from_release(cls, scheme: str, param: float = 0.0) -> NoiseSampler:
        """Map the release's ``t_weighting_scheme`` / ``t_weighting_scheme_param`` pair."""
        if scheme == "constant":
            return cls(scheme, value=param)
        if scheme == "power":
            return cls(scheme, power=param or 1.0)
        if scheme == "logit_normal":
            return cls(scheme, logit_mean=param)
        if scheme == "mode":
            return cls(scheme, mode_scale=param or 1.29)
        return cls(scheme)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.scheme == "constant":
            return torch.full((n,), float(self.value))
        if self.scheme == "logit_normal":
            z = torch.randn(n, generator=generator) * self.logit_std + self.logit_mean
            return torch.sigmoid(z)
        if self.scheme == "beta":
            return _beta_from_gammas(self.beta_a, self.beta_b, n, generator)
        u = torch.rand(n, generator=generator)
        if self.scheme == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        if self.scheme == "power":
            return u**self.power
        return u


def _beta_from_gammas(a: float, b: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Beta(a, b) as X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b): unlike torch.distributions.Beta it
    takes a generator, so seeded runs repeat."""
    x = torch._standard_gamma(torch.full((n,), float(a)), generator=generator)
    y = torch._standard_gamma(torch.full((n,), float(b)), generator=generator)
    return x / (x + y)
