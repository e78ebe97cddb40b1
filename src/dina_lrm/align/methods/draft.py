"""DRaFT-K (Clark et al. 2024): ODE samples whose last K steps keep the graph (each step
gradient-checkpointed); the loss is minus the weighted rewards of the clean samples."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from dina_lrm.align.methods import AlignMethod
from dina_lrm.align.sampling import initial_noise, sample_ode


@dataclass
class DraftConfig:
    sampling_steps: ClassVar[int] = 10
    ema_decay: ClassVar[float] = 0.0

    k: int = 1  # steps back-propagated through
    gradient_checkpointing: bool = True  # keep only each back-propagated step's input

    def validate(self, sampling_steps: int) -> None:
        if not 1 <= self.k <= sampling_steps:
            raise ValueError(f"draft.k must be between 1 and the {sampling_steps} sampling steps, got {self.k}")


class DRaFT(AlignMethod):
    name = "draft"

    def step(self, prompts: list[str], generator: torch.Generator, timings: dict) -> dict:
        loop, config = self.loop, self.config
        start = time.perf_counter()
        loop.policy.train()
        loop.optimizer.zero_grad(set_to_none=True)
        text = loop.conditioning(prompts)
        noise = initial_noise(len(prompts), loop.latent_shape, generator, text.states.device)
        latents = sample_ode(loop.velocity_fn(text, loop.train_schedule), loop.train_schedule, noise, grad_last_k=config.k,
                             checkpointed=config.gradient_checkpointing)
        timings["sampling"] = time.perf_counter() - start
        start = time.perf_counter()
        scores = loop.score_all(latents, prompts, loop.reward_seed(generator))
        timings["reward"] = time.perf_counter() - start
        start = time.perf_counter()
        loss = -sum(w * s.mean() for w, s in zip(loop.reward_weights, scores) if w)
        loop.accelerator.backward(loss)
        loop.clip_and_step()
        timings["update"] = time.perf_counter() - start
        return {**loop.reward_stats(scores), "loss": float(loss.detach()), "clip_fraction": 0.0, "kl": 0.0}
