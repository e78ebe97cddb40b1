"""One preference training step: chosen and rejected share sigma and eps, one backbone pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dina_lrm.losses import preference_loss
from dina_lrm.models.reward_model import DiNaLRM
from dina_lrm.noise import NoiseSampler, SigmaTable, add_noise


@dataclass
class PreferenceBatch:
    chosen: torch.Tensor  # (B, C, H, W) clean normalised latents
    rejected: torch.Tensor  # (B, C, H, W)
    encoder_hidden_states: torch.Tensor  # (B, L, D)
    pooled_projections: torch.Tensor  # (B, P)
    target: torch.Tensor | None = None  # (B,) P(chosen preferred); 1 when None


@dataclass
class StepOutput:
    loss: torch.Tensor
    chosen_scores: torch.Tensor  # (B,)
    rejected_scores: torch.Tensor  # (B,)
    sigma: torch.Tensor  # (B,)

    @property
    def accuracy(self) -> float:
        return (self.chosen_scores > self.rejected_scores).float().mean().item()


def preference_step(
    model: DiNaLRM,
    batch: PreferenceBatch,
    sigma_table: SigmaTable,
    sampler: NoiseSampler,
    loss_name: str | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Forward and loss for a batch of pairs (call ``loss.backward()`` and step the optimizer after)."""
    if batch.chosen.shape != batch.rejected.shape:
        raise ValueError(f"chosen {tuple(batch.chosen.shape)} and rejected {tuple(batch.rejected.shape)} differ in shape")
    size = batch.chosen.shape[0]
    sigma, timesteps = sigma_table.snap(sampler.sample(size, generator))
    noise = torch.randn(batch.chosen.shape, generator=generator).to(batch.chosen.device, batch.chosen.dtype)
    sigma, timesteps = sigma.to(batch.chosen.device), timesteps.to(batch.chosen.device)
    latents = torch.cat([add_noise(batch.chosen, sigma, noise), add_noise(batch.rejected, sigma, noise)])
    scores = model(
        latents,
        batch.encoder_hidden_states.repeat(2, 1, 1),
        batch.pooled_projections.repeat(2, 1),
        timesteps.repeat(2),
    )[:, 0]
    chosen, rejected = scores[:size], scores[size:]
    loss = preference_loss(loss_name or model.config.model.model_type, chosen, rejected, sigma, batch.target)
    return StepOutput(loss, chosen.detach(), rejected.detach(), sigma)
