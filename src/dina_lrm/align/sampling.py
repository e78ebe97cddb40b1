"""Sampling from a rectified-flow MMDiT (diffusers ``SD3Transformer2DModel``) with classifier-free
guidance: SDE trajectories with log-probabilities for GRPO (noise at every step, or only inside a
window of steps as Flow-GRPO-Fast does), ODE samples whose last K steps keep the graph for DRaFT-K,
and ODE samples stopped part-way for ReFL."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from dina_lrm.align.sde import SDEStep, cps_step, sde_step

SDE_TYPES = ("sde", "cps")


@dataclass
class TextConditioning:
    states: torch.Tensor  # (B, L, D) prompt embeddings
    pooled: torch.Tensor  # (B, P)
    negative_states: torch.Tensor  # (B, L, D) the unconditional prompt's, for guidance
    negative_pooled: torch.Tensor  # (B, P)

    def repeat(self, times: int) -> TextConditioning:
        return TextConditioning(*(t.repeat_interleave(times, dim=0) for t in (self.states, self.pooled, self.negative_states, self.negative_pooled)))

    def index(self, index) -> TextConditioning:
        return TextConditioning(self.states[index], self.pooled[index], self.negative_states[index], self.negative_pooled[index])


@dataclass
class Schedule:
    sigmas: torch.Tensor  # (T + 1,) from 1 down to 0
    timesteps: torch.Tensor  # (T,) what the transformer is given

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> Schedule:
        scheduler = copy.deepcopy(scheduler)  # set_timesteps mutates; the pipeline's stays untouched
        scheduler.set_timesteps(num_steps)
        return cls(scheduler.sigmas.float().cpu(), scheduler.timesteps.float().cpu())

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def sigma_below_one(self) -> float:
        return float(self.sigmas[self.sigmas < 1].max())

    def step(self, index: int, sample, velocity, noise_level: float, sde_type: str = "sde", **kwargs) -> SDEStep:
        """Step ``index`` (sigma_i -> sigma_{i+1}) with the Flow-GRPO SDE or the CPS sampler."""
        sigma, sigma_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
        if sde_type == "cps":
            return cps_step(sample, velocity, sigma, sigma_next, noise_level, **kwargs)
        if sde_type != "sde":
            raise ValueError(f"unknown sde_type {sde_type!r}; choose one of {SDE_TYPES}")
        return sde_step(sample, velocity, sigma, sigma_next, noise_level, self.sigma_below_one, **kwargs)


def predict_velocity(transformer, latents: torch.Tensor, timestep: torch.Tensor, text: TextConditioning, guidance_scale: float):
    """The guided velocity ``v_u + g (v_c - v_u)`` (one batched pass), or ``v_c`` when g <= 1."""
    dtype = next(transformer.parameters()).dtype
    if guidance_scale > 1:
        inputs = torch.cat([latents, latents])
        states, pooled = torch.cat([text.negative_states, text.states]), torch.cat([text.negative_pooled, text.pooled])
    else:
        inputs, states, pooled = latents, text.states, text.pooled
    velocity = transformer(
        hidden_states=inputs.to(dtype),
        encoder_hidden_states=states.to(dtype),
        pooled_projections=pooled.to(dtype),
        timestep=timestep.to(inputs.device).expand(inputs.shape[0]),
        return_dict=False,
    )[0].float()
    if guidance_scale > 1:
        unconditional, conditional = velocity.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)
    return velocity


@dataclass
class Trajectory:
    latents: torch.Tensor  # (T + 1, B, C, H, W): noise first, the clean sample last
    log_probs: torch.Tensor  # (T, B) of each step's sample under the sampling policy; NaN for deterministic steps
    noisy_steps: list[int]  # the steps that drew noise (and so have a log-probability)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


def initial_noise(batch: int, shape: tuple[int, int, int], generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn((batch, *shape), generator=generator).to(device)


@torch.no_grad()
def sample_sde(transformer, schedule: Schedule, text: TextConditioning, latent_shape, guidance_scale: float, noise_level: float,
               generator: torch.Generator, sde_type: str = "sde", noisy_steps: list[int] | None = None,
               start: torch.Tensor | None = None) -> Trajectory:
    """A trajectory of the SDE sampler with each noisy step's log-probability (noise_level > 0).
    ``noisy_steps``: the steps that draw noise (default: all that can); the others are Euler steps.
    ``start``: the initial noise (default: drawn from ``generator``)."""
    x = initial_noise(text.states.shape[0], latent_shape, generator, text.states.device) if start is None else start
    noisy = set(range(schedule.num_steps) if noisy_steps is None else noisy_steps)
    latents, log_probs, drawn = [x], [], []
    for i in range(schedule.num_steps):
        velocity = predict_velocity(transformer, x, schedule.timesteps[i], text, guidance_scale)
        step = schedule.step(i, x, velocity, noise_level if i in noisy else 0.0, sde_type, generator=generator)
        x = step.sample
        latents.append(x)
        if step.log_prob is None:
            log_probs.append(torch.full((x.shape[0],), float("nan"), device=x.device))
        else:
            log_probs.append(step.log_prob)
            drawn.append(i)
    return Trajectory(torch.stack(latents), torch.stack(log_probs), drawn)


def sample_ode(transformer, schedule: Schedule, text: TextConditioning, latent_shape, guidance_scale: float, generator: torch.Generator,
               grad_last_k: int = 0, checkpointed: bool = True, stop: int | None = None) -> torch.Tensor:
    """Clean latents from the Euler ODE, or with ``stop`` the latents x_t after the first ``stop`` steps
    (at sigma = ``schedule.sigmas[stop]``). The last ``grad_last_k`` steps keep the autograd graph (each
    gradient-checkpointed when ``checkpointed``: only its input is stored); earlier steps run without one."""
    x = initial_noise(text.states.shape[0], latent_shape, generator, text.states.device)
    num_steps = schedule.num_steps if stop is None else stop

    def euler(x, i):
        velocity = predict_velocity(transformer, x, schedule.timesteps[i], text, guidance_scale)
        return schedule.step(i, x, velocity, noise_level=0.0).sample

    for i in range(num_steps):
        if i < num_steps - grad_last_k:
            with torch.no_grad():
                x = euler(x, i)
        elif checkpointed:
            x = checkpoint(euler, x, i, use_reentrant=False)
        else:
            x = euler(x, i)
    return x
