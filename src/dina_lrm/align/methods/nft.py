"""DiffusionNFT (Zheng et al. 2025, "Online Diffusion Reinforcement with Forward Process"), as its
authors run it: reinforcement on the *forward* process, with clean samples and their rewards only.

Per step:

1. **Rollouts** from the *old* policy (an average of the trained LoRA, see 5.) with any ODE solver
   (``solver``; the authors' is a second-order DPM solver), without classifier-free guidance; only
   the clean latents are kept, so a latent reward (DiNa-LRM) scores them without a VAE decode.
2. **Rewards -> optimality probabilities**: each reward normalised within its prompt's group (or by
   the batch's std), mixed with the rewards' weights, clipped to [-A_max, A_max] and mapped to
   ``r = A / A_max / 2 + 1/2`` in [0, 1].
3. **Forward-process training** on (almost) every timestep of the sampling schedule, shuffled per
   sample: ``x_t = (1 - t) x0 + t eps`` with fresh noise, the old velocity ``v_old`` (no gradient) and
   the trained one ``v``; the implicit positive and negative policies ``v+ = beta v + (1 - beta) v_old``
   and ``v- = (1 + beta) v_old - beta v``; their clean predictions ``x0+- = x_t - t v+-``, each loss
   normalised by its own mean absolute error (no gradient, floor 1e-5); the loss is
   ``A_max * mean(r L+ / beta + (1 - r) L- / beta) + kl_coef * mean(|v - v_base|^2)``.
4. AdamW on the LoRA, gradients accumulated over the step's samples and timesteps
   (``updates_per_step`` optimizer steps per batch of rollouts).
5. After each step the old policy moves toward the trained one, ``old <- d old + (1 - d) current``,
   with d a schedule of the step (``old_decay``); an EMA of the LoRA (decay 0.9) is evaluated and saved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from dina_lrm.align.advantages import group_advantages
from dina_lrm.align.ema import EMA
from dina_lrm.align.methods import AlignMethod
from dina_lrm.align.sampling import SOLVERS, initial_noise, sample_ode

OLD_DECAYS = {  # the authors' decay types 0, 1 and 2 of the old policy, by step
    "none": lambda step: 0.0,
    "linear": lambda step: min(0.001 * step, 0.5),
    "delayed": lambda step: 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999),
}


@dataclass
class NFTConfig:
    sampling_steps: ClassVar[int] = 10  # the authors' training rollouts (40 at evaluation)
    ema_decay: ClassVar[float] = 0.9  # their evaluated and saved EMA

    group_size: int = 8  # rollouts per prompt (the authors: 24)
    beta: float = 1.0  # strength of the implicit positive / negative policies (the authors: 1.0; 0.1 for OCR)
    advantage_max: float = 5.0  # A_max: advantages clipped to [-A_max, A_max], then r = A / A_max / 2 + 1/2
    global_std: bool = False  # normalise rewards by the batch's std instead of each group's (verl-omni's default)
    timestep_fraction: float = 0.99  # share of the schedule's timesteps each sample trains on, drawn per sample
    kl_coef: float = 1e-4  # weight of mean |v - v_base|^2, the velocity's distance to the frozen generator
    old_decay: str = "linear"  # old policy's decay: none (d = 0), linear (min(0.001 step, 0.5)), delayed (0 for 75 steps, then +0.0075 per step)
    solver: str = "dpm2"  # rollout ODE solver: dpm2 (second-order DPM-Solver++) or euler
    updates_per_step: int = 1  # optimizer steps per batch of rollouts

    def validate(self, sampling_steps: int) -> None:
        """(Any schedule length suits DiffusionNFT.)"""
        if self.group_size < 2:
            raise ValueError(f"DiffusionNFT compares samples within a prompt's group: group_size must be >= 2, got {self.group_size}")
        if self.beta <= 0:
            raise ValueError(f"nft.beta must be > 0, got {self.beta}")
        if self.advantage_max <= 0:
            raise ValueError(f"nft.advantage_max (the advantage clip) must be > 0, got {self.advantage_max}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"nft.timestep_fraction must lie in (0, 1], got {self.timestep_fraction}")
        if self.kl_coef < 0:
            raise ValueError(f"nft.kl_coef must be >= 0, got {self.kl_coef}")
        if self.old_decay not in OLD_DECAYS:
            raise ValueError(f"unknown nft.old_decay {self.old_decay!r}; choose one of {tuple(OLD_DECAYS)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown nft.solver {self.solver!r}; the rollouts' ODE solver is one of {SOLVERS}")
        if self.updates_per_step < 1:
            raise ValueError(f"nft.updates_per_step must be >= 1, got {self.updates_per_step}")


def optimality_probability(advantages: torch.Tensor, advantage_max: float) -> torch.Tensor:
    """``r = clamp(A / A_max / 2 + 1/2, 0, 1)``: the probability that a sample is "optimal"."""
    return (advantages / advantage_max / 2 + 0.5).clamp(0.0, 1.0)


def implicit_policies(velocity: torch.Tensor, old_velocity: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``v+ = beta v + (1 - beta) v_old`` and ``v- = (1 + beta) v_old - beta v``, written as ``v_old +- beta (v - v_old)``
    so that at v = v_old both are v_old exactly: rounding would otherwise leave a gradient of ~1e-8 where
    r = 1/2, which Adam, being scale-free, turns into full-size steps."""
    step = beta * (velocity - old_velocity)
    return old_velocity + step, old_velocity - step


def adaptive_loss(prediction: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per sample: ``mean((x0_hat - x0)^2) / w`` with ``w = mean|x0_hat - x0|`` (no gradient, floor 1e-5)."""
    error = (prediction - clean).flatten(1)
    weight = error.detach().abs().mean(dim=1).clamp(min=1e-5)
    return error.pow(2).mean(dim=1) / weight


def nft_loss(velocity: torch.Tensor, old_velocity: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor, sigmas: torch.Tensor,
             optimality: torch.Tensor, beta: float, advantage_max: float) -> torch.Tensor:
    """The DiffusionNFT policy loss of one batch of noised samples; ``sigmas`` (B,) their noise levels,
    ``optimality`` (B,) their r."""
    t = sigmas.view(-1, *[1] * (noisy.dim() - 1))
    positive, negative = implicit_policies(velocity.float(), old_velocity.float(), beta)
    positive_loss = adaptive_loss(noisy - t * positive, clean)
    negative_loss = adaptive_loss(noisy - t * negative, clean)
    return advantage_max * (optimality * positive_loss / beta + (1 - optimality) * negative_loss / beta).mean()


def training_timesteps(num_samples: int, num_steps: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(N, k) schedule indices per sample: a random ``k = max(1, int(fraction T))`` of the T steps, shuffled."""
    count = max(1, int(fraction * num_steps))
    return torch.stack([torch.randperm(num_steps, generator=generator)[:count] for _ in range(num_samples)])


class NFT(AlignMethod):
    name = "nft"

    def __init__(self, loop):
        super().__init__(loop)
        self.old = EMA(loop.trainable, OLD_DECAYS[self.config.old_decay])

    def after_step(self, step: int) -> None:
        self.old.update(step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"old.{i}": average for i, average in enumerate(self.old.shadow_params)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.old.load_state_dict({"shadow_params": [state[f"old.{i}"] for i in range(len(self.old.shadow_params))]})

    def step(self, prompts: list[str], generator: torch.Generator, timings: dict) -> dict:
        loop, config = self.loop, self.config
        group = config.group_size
        expanded = [p for p in prompts for _ in range(group)]
        text = loop.conditioning(prompts).repeat(group)
        start = time.perf_counter()
        loop.policy.eval()
        noise = initial_noise(len(expanded), loop.latent_shape, generator, text.states.device)
        with torch.no_grad(), self.old.applied():
            clean = sample_ode(loop.velocity_fn(text, loop.train_schedule), loop.train_schedule, noise, solver=config.solver)
        timings["sampling"] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            scores = loop.score_all(clean, expanded, loop.reward_seed(generator))
        advantages = group_advantages([s.float().cpu() for s in scores], group, loop.reward_weights, config.advantage_max, config.global_std)
        optimality = optimality_probability(advantages, config.advantage_max).to(clean.device)
        timings["reward"] = time.perf_counter() - start
        start = time.perf_counter()
        losses, kls = self.train(clean, text, optimality, generator)
        timings["update"] = time.perf_counter() - start
        return {**loop.reward_stats(scores), "loss": sum(losses) / len(losses), "kl": sum(kls) / len(kls),
                "advantage_abs_mean": float(advantages.abs().mean()), "clip_fraction": float((advantages.abs() >= config.advantage_max).float().mean())}

    def train(self, clean: torch.Tensor, text, optimality: torch.Tensor, generator: torch.Generator) -> tuple[list[float], list[float]]:
        loop, config, schedule = self.loop, self.config, self.loop.train_schedule
        timesteps = training_timesteps(len(clean), schedule.num_steps, config.timestep_fraction, generator)
        order = torch.randperm(len(clean), generator=generator)
        guidance = loop.train_guidance
        losses, kls = [], []
        loop.policy.train()
        for minibatch in order.chunk(config.updates_per_step):
            loop.optimizer.zero_grad(set_to_none=True)
            sub_text, x0, r = text.index(minibatch), clean[minibatch], optimality[minibatch]
            for column in range(timesteps.shape[1]):
                sigmas = schedule.sigmas[timesteps[minibatch, column]].float().to(x0.device)
                noise = torch.randn(x0.shape, generator=generator).to(x0.device)
                noisy = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
                with torch.no_grad(), self.old.applied():
                    old_velocity = loop.adapter.velocity(loop.policy, noisy, sigmas, sub_text, guidance)
                velocity = loop.adapter.velocity(loop.policy, noisy, sigmas, sub_text, guidance)
                loss = nft_loss(velocity, old_velocity, noisy, x0, sigmas, r, config.beta, config.advantage_max)
                drift = torch.zeros(())
                if config.kl_coef > 0:
                    with torch.no_grad(), loop.reference_policy():
                        reference = loop.adapter.velocity(loop.policy, noisy, sigmas, sub_text, guidance)
                    drift = (velocity - reference).pow(2).mean()
                    loss = loss + config.kl_coef * drift
                loop.accelerator.backward(loss / timesteps.shape[1])
                losses.append(float(loss.detach()))
                kls.append(float(drift.detach()))
            loop.clip_and_step()
        return losses, kls
