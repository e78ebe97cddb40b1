"""The pixel-space baseline: a reward that must VAE-decode latents and read the images.

It stands in for VLM-based rewards (HPSv3, ImageReward) at toy scale: a CNN over the decoded
image, conditioned on the prompt's pooled embedding (FiLM), then the prompt's tokens attend over
the image regions. It gets the same frozen text embeddings and pairs as DiNa-LRM and is trained
with the Bradley-Terry loss; the decode is part of every step, as it is for a pixel reward in RL.
"""

from __future__ import annotations

import torch
from torch import nn

from dina_lrm import PreferenceBatch, StepOutput, preference_loss, vae_decode


class FiLMConvStage(nn.Module):
    """Two 3x3 convolutions (the first with stride 2), GroupNorm, SiLU, FiLM from the prompt."""

    def __init__(self, in_channels: int, out_channels: int, cond_width: int):
        super().__init__()
        self.down = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm = nn.GroupNorm(8, out_channels)
        self.film = nn.Linear(cond_width, 2 * out_channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.down(x))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        return x + nn.functional.silu(self.norm(self.conv(x)) * (1 + scale) + shift)


class PixelReward(nn.Module):
    def __init__(self, text_width: int, pooled_width: int, channels: tuple[int, ...] = (48, 96, 160, 192), heads: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, channels[0], 3, padding=1)
        self.stages = nn.ModuleList(
            FiLMConvStage(c_in, c_out, pooled_width) for c_in, c_out in zip(channels[:1] + channels[:-1], channels)
        )
        width = channels[-1]
        self.text_proj = nn.Linear(text_width, width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(width + pooled_width), nn.Linear(width + pooled_width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, pixels: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``pixels`` (B, 3, H, W) in [-1, 1] -> (B,) scores."""
        x = self.stem(pixels)
        for stage in self.stages:
            x = stage(x, pooled)
        regions = x.flatten(2).transpose(1, 2)
        queries = self.text_proj(encoder_hidden_states)
        attended, _ = self.attention(queries, regions, regions, need_weights=False)
        return self.out(torch.cat([attended.mean(dim=1), pooled], dim=-1))[:, 0]


@torch.no_grad()
def decode_for_reward(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> decoded pixels in [-1, 1]."""
    return vae_decode(vae, latents) * 2 - 1


def pixel_preference_step(model: PixelReward, vae, batch: PreferenceBatch, generator=None) -> StepOutput:
    """Decode both sides of each pair, score the images, Bradley-Terry loss."""
    size = batch.chosen.shape[0]
    pixels = decode_for_reward(vae, torch.cat([batch.chosen, batch.rejected]))
    scores = model(pixels, batch.encoder_hidden_states.repeat(2, 1, 1), batch.pooled_projections.repeat(2, 1))
    chosen, rejected = scores[:size], scores[size:]
    sigma = torch.zeros(size)
    return StepOutput(preference_loss("bt", chosen, rejected, sigma, batch.target), chosen.detach(), rejected.detach(), sigma)
