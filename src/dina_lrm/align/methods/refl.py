"""ReFL (reward feedback learning), as the DiNa-LRM authors' released SD3.5 recipe runs it.

Per step: a stop index ``k`` drawn uniformly from a late window of a T-step schedule (40 steps, k in
30..39); steps 0..k-1 run without gradient (Euler, with guidance); step k is one grad-enabled,
conditional transformer call whose one-step clean prediction ``x0_hat = x_k - sigma_k v`` is scored by
differentiable rewards; the loss is ``sum_w w mean(c - reward)``. Against reward hacking: the
flow-matching "pretrain" loss on a latent set, mixed as ``(L_refl + lambda L_pt) / (1 + lambda)`` (the
authors' remedy), an L2 of the velocity to the frozen generator's (``kl_coef``), the reward's own
noise ensemble (``reward.noise_levels``) or a higher ``reward.u``, and the judge guard's early stop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from dina_lrm.align.methods import AlignMethod
from dina_lrm.align.sampling import initial_noise, sample_ode
from dina_lrm.data.shards import load_preference_shards
from dina_lrm.noise import SigmaTable, add_noise

REFL_LOSS_OFFSET = 2.0  # the c of mean(c - score) in the authors' script; it does not change the gradient


@dataclass
class ReFLConfig:
    sampling_steps: ClassVar[int] = 40  # the released recipe's schedule
    ema_decay: ClassVar[float] = 0.0

    stop_range: list[int] | None = None  # [first, end) of the stop index; default: the last quarter of the schedule
    pretrain_data: str = ""  # preference shards whose chosen latents feed the flow-matching "pretrain" loss
    pretrain_weight: float = 0.0  # lambda in (L_refl + lambda L_pt) / (1 + lambda)
    pretrain_batch_size: int = 4
    kl_coef: float = 0.0  # weight of mean |v - v_base|^2 at the stop step

    def stop_window(self, sampling_steps: int) -> tuple[int, int]:
        first, end = self.stop_range or (sampling_steps - sampling_steps // 4, sampling_steps)
        return first, end

    def validate(self, sampling_steps: int) -> None:
        first, end = self.stop_window(sampling_steps)
        if not 0 <= first < end <= sampling_steps:
            raise ValueError(f"refl.stop_range [{first}, {end}) lies outside the {sampling_steps}-step schedule "
                             f"(stop indices 0..{sampling_steps - 1})")
        if self.pretrain_weight < 0 or self.kl_coef < 0:
            raise ValueError("refl.pretrain_weight and refl.kl_coef must be >= 0")
        if self.pretrain_weight > 0 and not self.pretrain_data:
            raise ValueError("refl.pretrain_weight > 0 needs refl.pretrain_data: a folder of preference shards with the latents to keep fitting")
        if self.pretrain_batch_size < 1:
            raise ValueError(f"refl.pretrain_batch_size must be >= 1, got {self.pretrain_batch_size}")


def draw_stop_index(window: tuple[int, int], generator: torch.Generator) -> int:
    """A stop index drawn uniformly from ``[window[0], window[1])``."""
    low, high = window
    return int(torch.randint(low, high, (1,), generator=generator))


def predicted_clean(sample: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """The one-step clean prediction ``x0_hat = x_sigma - sigma v`` of rectified flow (v = eps - x0)."""
    return sample - sigma * velocity


class LatentSet:
    """Clean latents with their prompts for the flow-matching loss: the chosen side of preference
    shards written by ``dina-lrm prepare`` (or the toy world), each distinct latent once."""

    def __init__(self, latents: torch.Tensor, prompts: list[str]):
        if len(latents) == 0:
            raise ValueError("the pretrain latent set is empty")
        self.latents, self.prompts = latents, prompts

    @classmethod
    def from_shards(cls, directory: str | Path) -> LatentSet:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"pretrain data not found: {directory} (a folder of preference shards)")
        pairs = load_preference_shards(directory)
        _, inverse = torch.unique(pairs.chosen.flatten(1), dim=0, return_inverse=True)
        first: dict[int, int] = {}
        for row, latent_id in enumerate(inverse.tolist()):
            first.setdefault(latent_id, row)
        keep = sorted(first.values())
        return cls(pairs.chosen[keep], [pairs.prompts[i] for i in keep])

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        index = torch.randint(len(self.latents), (size,), generator=generator)
        return self.latents[index], [self.prompts[i] for i in index.tolist()]


def flow_matching_loss(velocity_fn, latents: torch.Tensor, table: SigmaTable, generator: torch.Generator) -> torch.Tensor:
    """``mean |v(x_sigma) - (eps - x0)|^2`` with sigma uniform over the scheduler's training table;
    ``velocity_fn(noisy, sigmas)`` is the policy's conditional velocity."""
    index = torch.randint(len(table.sigmas), (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    sigmas = table.sigmas[index].to(latents.device)
    prediction = velocity_fn(add_noise(latents, sigmas, noise), sigmas.float())
    return (prediction - (noise - latents).float()).pow(2).mean()


class ReFL(AlignMethod):
    name = "refl"

    def __init__(self, loop):
        super().__init__(loop)
        self.window = self.config.stop_window(loop.train_schedule.num_steps)
        self.latent_set = LatentSet.from_shards(self.config.pretrain_data) if self.config.pretrain_weight else None
        self.sigma_table = SigmaTable.from_scheduler(loop.adapter.scheduler)

    def step(self, prompts: list[str], generator: torch.Generator, timings: dict) -> dict:
        loop, schedule = self.loop, self.loop.train_schedule
        text = loop.conditioning(prompts)
        stop = draw_stop_index(self.window, generator)
        start = time.perf_counter()
        loop.policy.eval()
        noise = initial_noise(len(prompts), loop.latent_shape, generator, text.states.device)
        with torch.no_grad():
            latents = sample_ode(loop.velocity_fn(text, schedule), schedule, noise, stop=stop)
        timings["sampling"] = time.perf_counter() - start
        start = time.perf_counter()
        loop.policy.train()
        loop.optimizer.zero_grad(set_to_none=True)
        sigma = float(schedule.sigmas[stop])
        conditional = loop.adapter.conditional_scale(loop.train_guidance)
        velocity = loop.adapter.velocity(loop.policy, latents, sigma, text, conditional)
        clean = predicted_clean(latents, velocity, sigma)
        timings["policy_forward"] = time.perf_counter() - start
        start = time.perf_counter()
        scores = loop.score_all(clean, prompts, loop.reward_seed(generator))
        timings["reward"] = time.perf_counter() - start
        start = time.perf_counter()
        refl = sum(w * (REFL_LOSS_OFFSET - s).mean() for w, s in zip(loop.reward_weights, scores) if w)
        loss, stats = self.regularised(refl, latents, velocity, sigma, text, generator)
        loop.accelerator.backward(loss)
        loop.clip_and_step()
        timings["update"] = time.perf_counter() - start
        return {**loop.reward_stats(scores), **stats, "loss": float(loss.detach()), "stop_index": stop, "clip_fraction": 0.0}

    def regularised(self, loss: torch.Tensor, latents, velocity, sigma: float, text, generator) -> tuple[torch.Tensor, dict]:
        """Add the L2 to the frozen generator's velocity (``kl_coef``) and mix in the flow-matching loss
        as ``(L + lambda L_pt) / (1 + lambda)``."""
        loop, config, stats = self.loop, self.config, {"kl": 0.0}
        conditional = loop.adapter.conditional_scale(loop.train_guidance)
        if config.kl_coef > 0:
            with torch.no_grad(), loop.reference_policy():
                reference = loop.adapter.velocity(loop.policy, latents, sigma, text, conditional)
            drift = (velocity - reference).pow(2).mean()
            loss = loss + config.kl_coef * drift
            stats["kl"] = float(drift.detach())
        if self.latent_set is not None:
            batch, batch_prompts = self.latent_set.batch(config.pretrain_batch_size, generator)
            batch_text = loop.conditioning(batch_prompts)
            pretrain = flow_matching_loss(lambda noisy, sigmas: loop.adapter.velocity(loop.policy, noisy, sigmas, batch_text, conditional),
                                          batch.to(latents.device), self.sigma_table, generator)
            loss = (loss + config.pretrain_weight * pretrain) / (1 + config.pretrain_weight)
            stats["pretrain_loss"] = float(pretrain.detach())
        return loss, stats
