"""ReFL (reward feedback learning) pieces, as the authors' released SD3.5 recipe runs them.

Per iteration: a stop index ``k`` drawn uniformly from a late window of a T-step schedule (40 steps,
k in 30..39); steps 0..k-1 run without gradient (Euler, with guidance); step k is one grad-enabled,
conditional transformer call whose one-step clean prediction ``x0_hat = x_k - sigma_k v`` is scored by
a differentiable reward; the loss is ``mean(c - reward)``. The optional "pretrain" loss is plain
flow matching on a latent set, mixed as ``(L_refl + lambda L_pt) / (1 + lambda)``: the authors'
remedy for reward hacking.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dina_lrm.data.shards import load_preference_shards
from dina_lrm.noise import SigmaTable, add_noise

REFL_LOSS_OFFSET = 2.0  # the c of mean(c - score) in the authors' script; it does not change the gradient


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


def flow_matching_loss(transformer, latents: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor, table: SigmaTable,
                       generator: torch.Generator) -> torch.Tensor:
    """``mean |v(x_sigma) - (eps - x0)|^2`` with sigma uniform over the scheduler's training table."""
    index = torch.randint(len(table.sigmas), (latents.shape[0],), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    noisy = add_noise(latents, table.sigmas[index], noise)
    dtype = next(transformer.parameters()).dtype
    prediction = transformer(hidden_states=noisy.to(dtype), encoder_hidden_states=states.to(dtype), pooled_projections=pooled.to(dtype),
                             timestep=table.timesteps[index].to(latents.device), return_dict=False)[0].float()
    return (prediction - (noise - latents).float()).pow(2).mean()
