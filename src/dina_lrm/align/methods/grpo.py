"""Flow-GRPO and Flow-GRPO-Fast, with flow_grpo's conventions, so its hyperparameters mean here what
they mean there.

Per step: G SDE (or CPS) samples per prompt (noise at every step but the last, or only in a window of
``sde_window_size`` steps placed at random within ``sde_window_range``: Flow-GRPO-Fast); each reward
normalised within its prompt's group (or by the batch's std) and mixed with the rewards' weights into
advantages; samples whose advantage is zero (groups of equal rewards) leave the batch, as flow_grpo
drops them; the PPO-style clipped ratio objective on the first ``int(timestep_fraction T)`` noisy
steps (all of a window's), split into ``updates_per_step`` optimizer steps, with an optional KL of the
SDE means to the frozen generator's. Log-probabilities and the KL follow ``likelihood`` (see
``align/sde.py``): flow_grpo's by default, or exact Gaussians.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from dina_lrm.align.advantages import group_advantages, informative_samples
from dina_lrm.align.methods import AlignMethod
from dina_lrm.align.sampling import initial_noise, noisy_step, sample_sde
from dina_lrm.align.sde import LIKELIHOODS, SDE_TYPES, gaussian_kl


@dataclass
class GRPOConfig:
    sampling_steps: ClassVar[int] = 10
    ema_decay: ClassVar[float] = 0.0

    group_size: int = 4  # samples per prompt
    sde_type: str = "sde"  # sde (Flow-GRPO) or cps (coefficients-preserving)
    noise_level: float = 0.7
    sde_window_size: int = 0  # > 0: noise (and training) only in a window of this many steps, drawn per step (Flow-GRPO-Fast)
    sde_window_range: list[int] | None = None  # [first, end) the window lies in; default: every step
    timestep_fraction: float = 1.0  # without a window: train the first int(fraction x steps) noisy steps
    global_std: bool = False  # normalise advantages by the batch's std instead of each group's
    same_initial_noise: bool = False  # a prompt's group starts from one initial noise (Flow-GRPO's same_latent)
    clip_range: float = 1e-4
    advantage_clip: float = 5.0
    updates_per_step: int = 2  # optimizer steps per batch of samples: later ones see ratios != 1
    kl_coef: float = 0.0  # flow_grpo's beta: KL of the SDE means to the frozen generator's
    likelihood: str = "flow_grpo"  # log-probability and KL convention: flow_grpo or gaussian (see align/sde.py)
    drop_zero_advantage: bool = True  # leave samples of all-equal groups out of the update, as flow_grpo

    def validate(self, sampling_steps: int) -> None:
        if self.group_size < 2:
            raise ValueError(f"GRPO compares samples within a prompt's group: group_size must be >= 2, got {self.group_size}")
        if self.sde_type not in SDE_TYPES:
            raise ValueError(f"unknown grpo.sde_type {self.sde_type!r}; choose one of {SDE_TYPES}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown grpo.likelihood {self.likelihood!r}; choose one of {LIKELIHOODS}")
        if not 0 < self.timestep_fraction <= 1 or self.noise_level <= 0:
            raise ValueError("grpo.timestep_fraction must be in (0, 1] and grpo.noise_level > 0")
        if self.clip_range <= 0 or self.advantage_clip <= 0:
            raise ValueError(f"grpo.clip_range and grpo.advantage_clip must be > 0, got {self.clip_range} and {self.advantage_clip}")
        if self.sde_window_size < 0 or self.updates_per_step < 1 or self.kl_coef < 0:
            raise ValueError("grpo.sde_window_size and grpo.kl_coef must be >= 0, grpo.updates_per_step >= 1")
        first, end = self.noise_window(sampling_steps)
        if self.sde_window_size and not 0 <= first < first + self.sde_window_size <= end <= sampling_steps:
            raise ValueError(f"an SDE window of {self.sde_window_size} steps does not fit grpo.sde_window_range [{first}, {end}) "
                             f"within the {sampling_steps}-step schedule")

    def noise_window(self, sampling_steps: int) -> tuple[int, int]:
        first, end = self.sde_window_range or (0, sampling_steps)
        return first, end


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(log_prob - old_log_prob)``;
    returns (loss, the fraction of samples where clipping was active)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, clip_fraction.detach()


def noisy_steps(config: GRPOConfig, sampling_steps: int, generator: torch.Generator) -> list[int]:
    """Flow-GRPO-Fast: a window of ``sde_window_size`` steps placed at random within its range; without a
    window, every step but the last (flow_grpo's last step is deterministic)."""
    if not config.sde_window_size:
        return list(range(max(1, sampling_steps - 1)))
    first, end = config.noise_window(sampling_steps)
    start = int(torch.randint(first, end - config.sde_window_size + 1, (1,), generator=generator))
    return list(range(start, start + config.sde_window_size))


def trained_steps(config: GRPOConfig, noisy: list[int], sampling_steps: int) -> list[int]:
    """Every step of a window; without one, flow_grpo's first ``int(timestep_fraction x T)`` steps."""
    if config.sde_window_size:
        return list(noisy)
    return list(noisy[: max(1, int(config.timestep_fraction * sampling_steps))])


class GRPO(AlignMethod):
    name = "grpo"

    def step(self, prompts: list[str], generator: torch.Generator, timings: dict) -> dict:
        loop, config, schedule = self.loop, self.config, self.loop.train_schedule
        group = config.group_size
        expanded = [p for p in prompts for _ in range(group)]
        text = loop.conditioning(prompts).repeat(group)
        start = time.perf_counter()
        loop.policy.eval()
        if config.same_initial_noise:  # a group's samples then differ only by the noise the policy's steps draw
            noise = initial_noise(len(prompts), loop.latent_shape, generator, text.states.device).repeat_interleave(group, dim=0)
        else:
            noise = initial_noise(len(expanded), loop.latent_shape, generator, text.states.device)
        noisy = noisy_steps(config, schedule.num_steps, generator)
        trajectory = sample_sde(loop.velocity_fn(text, schedule), schedule, noise, config.noise_level, generator, config.sde_type, noisy,
                                config.likelihood)
        timings["sampling"] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            scores = loop.score_all(trajectory.final, expanded, loop.reward_seed(generator))
        advantages = group_advantages([s.float().cpu() for s in scores], group, loop.reward_weights, config.advantage_clip,
                                      config.global_std)
        timings["reward"] = time.perf_counter() - start
        start = time.perf_counter()
        kept = (informative_samples(advantages, config.updates_per_step, generator) if config.drop_zero_advantage
                else torch.arange(len(expanded)))
        steps = trained_steps(config, trajectory.noisy_steps, schedule.num_steps)
        order = kept[torch.randperm(len(kept), generator=generator)]
        advantages = advantages.to(trajectory.final.device)
        losses, clip_fractions, kls = [], [], []
        loop.policy.train()
        for minibatch in order.chunk(config.updates_per_step):
            loop.optimizer.zero_grad(set_to_none=True)
            for i in steps:
                loss, clip_fraction, kl = self.loss(trajectory, i, minibatch, text.index(minibatch), advantages[minibatch])
                loop.accelerator.backward(loss / len(steps))
                losses.append(loss.item())
                clip_fractions.append(float(clip_fraction))
                kls.append(float(kl))
            loop.clip_and_step()
        timings["update"] = time.perf_counter() - start
        return {**loop.reward_stats(scores), "loss": sum(losses) / max(len(losses), 1),
                "clip_fraction": sum(clip_fractions) / max(len(clip_fractions), 1), "kl": sum(kls) / max(len(kls), 1),
                "advantage_abs_mean": float(advantages.abs().mean()), "trained_samples": len(kept)}

    def loss(self, trajectory, i: int, minibatch: torch.Tensor, text, advantages: torch.Tensor):
        loop, config, schedule = self.loop, self.config, self.loop.train_schedule
        sample, next_sample = trajectory.latents[i][minibatch], trajectory.latents[i + 1][minibatch]
        sigma = float(schedule.sigmas[i])
        velocity = loop.adapter.velocity(loop.policy, sample, sigma, text, loop.train_guidance)
        step = noisy_step(schedule, i, sample, velocity, config.noise_level, config.sde_type, next_sample=next_sample,
                          likelihood=config.likelihood)
        loss, clip_fraction = clipped_policy_loss(step.log_prob, trajectory.log_probs[i][minibatch], advantages, config.clip_range)
        kl = torch.zeros(())
        if config.kl_coef > 0:
            with torch.no_grad(), loop.reference_policy():
                reference = loop.adapter.velocity(loop.policy, sample, sigma, text, loop.train_guidance)
                reference_mean = noisy_step(schedule, i, sample, reference, config.noise_level, config.sde_type, next_sample=next_sample,
                                            likelihood=config.likelihood).mean
            kl = gaussian_kl(step.mean, reference_mean, step.kl_std).mean()
            loss = loss + config.kl_coef * kl
        return loss, clip_fraction, kl.detach()
