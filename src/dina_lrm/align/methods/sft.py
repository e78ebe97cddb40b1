"""Supervised fine-tuning on a latent set: the flow-matching loss on latents the user trusts (the
chosen side of preference shards), with no reward in the update. It is the reference an alignment
method is measured against on the same budget (steps, samples, optimizer updates), and the test that
a base generator can be moved at all; the rewards are only logged."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from dina_lrm.align.methods import AlignMethod
from dina_lrm.align.methods.refl import LatentSet, flow_matching_loss
from dina_lrm.noise import SigmaTable


@dataclass
class SFTConfig:
    sampling_steps: ClassVar[int] = 10
    ema_decay: ClassVar[float] = 0.0

    data: str = ""  # preference shards whose chosen latents are fitted
    batch_size: int = 64  # latents per step
    noise_draws: int = 1  # noise levels (and noises) each latent is fitted at per step
    updates_per_step: int = 1  # optimizer steps per step's batch

    def validate(self, sampling_steps: int) -> None:
        if not self.data:
            raise ValueError("sft needs sft.data: a folder of preference shards whose chosen latents it fits")
        if min(self.batch_size, self.noise_draws, self.updates_per_step) < 1:
            raise ValueError("sft.batch_size, sft.noise_draws and sft.updates_per_step must be >= 1")


class SFT(AlignMethod):
    name = "sft"

    def __init__(self, loop):
        super().__init__(loop)
        self.latent_set = LatentSet.from_shards(self.config.data)
        self.sigma_table = SigmaTable.from_scheduler(loop.adapter.scheduler)

    def step(self, prompts: list[str], generator: torch.Generator, timings: dict) -> dict:
        loop, config = self.loop, self.config
        start = time.perf_counter()
        latents, batch_prompts = self.latent_set.batch(config.batch_size, generator)
        latents = latents.to(loop.accelerator.device)
        text = loop.conditioning(batch_prompts)
        conditional = loop.adapter.conditional_scale(loop.train_guidance)
        losses = []
        loop.policy.train()
        for minibatch in torch.randperm(len(latents), generator=generator).chunk(config.updates_per_step):
            loop.optimizer.zero_grad(set_to_none=True)
            sub_text, sub_latents = text.index(minibatch), latents[minibatch]
            for _ in range(config.noise_draws):
                loss = flow_matching_loss(lambda noisy, sigmas: loop.adapter.velocity(loop.policy, noisy, sigmas, sub_text, conditional),
                                          sub_latents, self.sigma_table, generator)
                loop.accelerator.backward(loss / config.noise_draws)
                losses.append(float(loss.detach()))
            loop.clip_and_step()
        timings["update"] = time.perf_counter() - start
        return {"samples": len(latents), "loss": sum(losses) / len(losses), "clip_fraction": 0.0, "kl": 0.0}
