"""Samplers of a rectified-flow generator, written against a velocity function ``velocity(x, i)``
(the policy's guided velocity at step i of a :class:`~dina_lrm.models.policy.Schedule`):

* :func:`sample_ode`: the deterministic ODE with the Euler step (the pipelines' own scheduler step) or
  ``dpm2``, the second-order multistep DPM-Solver++ on the same sigmas (DiffusionNFT's rollouts), with
  the last K steps keeping the graph (DRaFT-K) or stopped part-way (ReFL);
* :func:`sample_sde`: SDE / CPS trajectories with each noisy step's log-probability (Flow-GRPO), noise
  at every step or only in a window of steps (Flow-GRPO-Fast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from dina_lrm.align.sde import SDE_TYPES, SDEStep, cps_step, sde_step
from dina_lrm.models.policy import Schedule

SOLVERS = ("euler", "dpm2")
VelocityFn = Callable[[torch.Tensor, int], torch.Tensor]  # (x at step i, i) -> v = eps - x0


def initial_noise(batch: int, shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """Standard normal latents drawn on the CPU from ``generator`` (the same on every device)."""
    return torch.randn((batch, *shape), generator=generator).to(device)


def noisy_step(schedule: Schedule, index: int, sample, velocity, noise_level: float, sde_type: str = "sde", **kwargs) -> SDEStep:
    """Step ``index`` (sigma_i -> sigma_{i+1}) with the Flow-GRPO SDE or the CPS sampler."""
    sigma, sigma_next = float(schedule.sigmas[index]), float(schedule.sigmas[index + 1])
    if sde_type == "cps":
        return cps_step(sample, velocity, sigma, sigma_next, noise_level, **kwargs)
    if sde_type != "sde":
        raise ValueError(f"unknown sde_type {sde_type!r}; choose one of {SDE_TYPES}")
    return sde_step(sample, velocity, sigma, sigma_next, noise_level, schedule.sigma_below_one, **kwargs)


def euler_step(schedule: Schedule, index: int, sample: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    dt = float(schedule.sigmas[index + 1] - schedule.sigmas[index])
    return (sample.float() + dt * velocity.float()).to(sample.dtype)


class DPMSolver2:
    """Multistep DPM-Solver++ (2M) in data prediction for rectified flow (alpha = 1 - sigma): first
    order on the first step, second order after, and the clean prediction itself on the last step
    (to sigma = 0). One velocity per step, as Euler."""

    def __init__(self, schedule: Schedule):
        self.sigmas = schedule.sigmas.double()
        self.previous: torch.Tensor | None = None

    def lam(self, index: int) -> torch.Tensor:
        sigma = self.sigmas[index]
        return torch.log(1 - sigma) - torch.log(sigma)

    def step(self, index: int, sample: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        clean = sample.double() - sigma * velocity.double()
        if sigma_next == 0:
            result = clean
        else:
            h = self.lam(index + 1) - self.lam(index)
            scale = -(1 - sigma_next) * torch.expm1(-h)
            estimate = clean
            if self.previous is not None:
                estimate = clean + 0.5 * h / (self.lam(index) - self.lam(index - 1)) * (clean - self.previous)
            result = (sigma_next / sigma) * sample.double() + scale * estimate
        self.previous = clean
        return result.to(sample.dtype)


def sample_ode(velocity: VelocityFn, schedule: Schedule, start: torch.Tensor, *, solver: str = "euler", grad_last_k: int = 0,
               checkpointed: bool = True, stop: int | None = None) -> torch.Tensor:
    """Clean latents from ``start`` (noise at sigma_0), or with ``stop`` the latents after the first
    ``stop`` steps (at sigma = ``schedule.sigmas[stop]``). The last ``grad_last_k`` steps keep the
    autograd graph (each gradient-checkpointed when ``checkpointed``); earlier steps run without one."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; choose one of {SOLVERS}")
    if solver == "dpm2" and grad_last_k:
        raise ValueError("back-propagating through sampling (DRaFT) uses the euler solver")
    dpm = DPMSolver2(schedule) if solver == "dpm2" else None
    x = start
    num_steps = schedule.num_steps if stop is None else stop

    def step(x, i):
        v = velocity(x, i)
        return dpm.step(i, x, v) if dpm is not None else euler_step(schedule, i, x, v)

    for i in range(num_steps):
        if i < num_steps - grad_last_k:
            with torch.no_grad():
                x = step(x, i)
        elif checkpointed:
            x = checkpoint(step, x, i, use_reentrant=False)
        else:
            x = step(x, i)
    return x


@dataclass
class Trajectory:
    latents: torch.Tensor  # (T + 1, B, C, H, W): noise first, the clean sample last
    log_probs: torch.Tensor  # (T, B) of each step's sample under the sampling policy; NaN for deterministic steps
    noisy_steps: list[int]  # the steps that drew noise (and so have a log-probability)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


@torch.no_grad()
def sample_sde(velocity: VelocityFn, schedule: Schedule, start: torch.Tensor, noise_level: float, generator: torch.Generator,
               sde_type: str = "sde", noisy_steps: list[int] | None = None, likelihood: str = "flow_grpo") -> Trajectory:
    """A trajectory of the SDE (or CPS) sampler with each noisy step's log-probability.
    ``noisy_steps``: the steps that draw noise (default: every step); the others are Euler steps."""
    noisy = set(range(schedule.num_steps) if noisy_steps is None else noisy_steps)
    x, latents, log_probs, drawn = start, [start], [], []
    for i in range(schedule.num_steps):
        step = noisy_step(schedule, i, x, velocity(x, i), noise_level if i in noisy else 0.0, sde_type, generator=generator,
                          likelihood=likelihood)
        x = step.sample
        latents.append(x)
        if step.log_prob is None:
            log_probs.append(torch.full((x.shape[0],), float("nan"), device=x.device))
        else:
            log_probs.append(step.log_prob)
            drawn.append(i)
    return Trajectory(torch.stack(latents), torch.stack(log_probs), drawn)
