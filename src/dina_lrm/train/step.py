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


@dataclass
class PairNoise:
    sigma: torch.Tensor  # (B,) snapped noise levels
    timesteps: torch.Tensor  # (B,) the backbone timesteps of those levels
    noise: torch.Tensor | None  # (B, C, H, W) eps shared by chosen and rejected; None: score clean latents


def draw_noise(
    sigma_table: SigmaTable,
    sampler: NoiseSampler,
    shape: torch.Size,
    generator: torch.Generator | None = None,
    noised: bool = True,
    replicas: int = 1,
    rank: int = 0,
) -> PairNoise:
    """Noise for one process's share of a global batch.

    The draws are made for all ``replicas * B`` pairs from a generator every process holds in the
    same state, and this process keeps slice ``rank``: N processes with batch B then train on the
    very noise one process with batch N*B would draw.
    """
    size = shape[0]
    if not noised:
        sigma, timesteps = sigma_table.snap(torch.zeros(size))
        return PairNoise(sigma, timesteps, None)
    mine = slice(rank * size, (rank + 1) * size)
    u = sampler.sample(replicas * size, generator)[mine]
    noise = torch.randn((replicas * size, *shape[1:]), generator=generator)[mine]
    sigma, timesteps = sigma_table.snap(u)
    return PairNoise(sigma, timesteps, noise)


def preference_forward(model: DiNaLRM, batch: PreferenceBatch, noise: PairNoise, loss_name: str | None = None) -> StepOutput:
    """Forward and loss for a batch of pairs (call ``loss.backward()`` and step the optimizer after)."""
    if batch.chosen.shape != batch.rejected.shape:
        raise ValueError(f"chosen {tuple(batch.chosen.shape)} and rejected {tuple(batch.rejected.shape)} differ in shape")
    device, size = batch.chosen.device, batch.chosen.shape[0]
    sigma, timesteps = noise.sigma.to(device), noise.timesteps.to(device)
    pair = torch.cat([batch.chosen, batch.rejected])
    if noise.noise is not None:
        eps = noise.noise.to(device, batch.chosen.dtype).repeat(2, 1, 1, 1)
        pair = add_noise(pair, sigma.repeat(2), eps)
    scores = model(
        pair,
        batch.encoder_hidden_states.repeat(2, 1, 1),
        batch.pooled_projections.repeat(2, 1),
        timesteps.repeat(2),
    )[:, 0]
    chosen, rejected = scores[:size], scores[size:]
    loss = preference_loss(loss_name or model.config.model.model_type, chosen, rejected, sigma, batch.target)
    return StepOutput(loss, chosen.detach(), rejected.detach(), sigma)


def preference_step(
    model: DiNaLRM,
    batch: PreferenceBatch,
    sigma_table: SigmaTable,
    sampler: NoiseSampler,
    loss_name: str | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Draw shared noise for the batch and run :func:`preference_forward` (single process)."""
    noise = draw_noise(sigma_table, sampler, batch.chosen.shape, generator, model.config.training.add_noise)
    return preference_forward(model, batch, noise, loss_name)
