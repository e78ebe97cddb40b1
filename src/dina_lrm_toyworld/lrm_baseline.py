"""The earlier latent reward model (LRM, as LPO builds it), on DiNa-LRM's own backbone.

LPO's LRM pools the diffusion backbone's visual features, projects them and the prompt's text
embedding into one space, and scores their cosine; it trains with the Bradley-Terry loss on a
learned temperature, on noisy latents. Here it gets the same backbone blocks, LoRA and noise
sampling as DiNa-LRM, so the ablation isolates what DiNa-LRM changes: the reward head and the loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dina_lrm import DiNaLRM, NoiseSampler, PreferenceBatch, SigmaTable, StepOutput, add_noise, draw_noise, preference_loss


class PooledCosineHead(nn.Module):
    """cos(W_v mean(visual tokens), W_t pooled text embedding), with a CLIP-style learned temperature."""

    def __init__(self, visual_width: int, text_width: int, dim: int = 256):
        super().__init__()
        self.visual = nn.Sequential(nn.LayerNorm(visual_width), nn.Linear(visual_width, dim))
        self.text = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, visual_tokens: torch.Tensor, pooled_text: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv), (B, Dt) -> cosine scores (B, 1) in [-1, 1]."""
        cosine = F.cosine_similarity(self.visual(visual_tokens.mean(dim=1)), self.text(pooled_text), dim=-1)
        return cosine[:, None]


class PooledCosineLRM(nn.Module):
    """DiNa-LRM's backbone (blocks, LoRA, input checks) under LPO's head: scores are cosines in [-1, 1].
    It holds a :class:`DiNaLRM` for its backbone (whose own head stays frozen and unused) and scores
    through a :class:`~dina_lrm.scorer.Scorer` as any :class:`~dina_lrm.scorer.LatentRewardModel`."""

    def __init__(self, config, transformer: nn.Module):
        super().__init__()
        self.lrm = DiNaLRM(config, transformer)
        self.lrm.reward_head.requires_grad_(False)
        backbone = self.lrm.base_backbone
        self.reward_head = PooledCosineHead(backbone.hidden_size, backbone.pooled_width).to(self.lrm.device, self.lrm.dtype)

    config = property(lambda self: self.lrm.config)
    base_backbone = property(lambda self: self.lrm.base_backbone)
    device = property(lambda self: self.lrm.device)
    dtype = property(lambda self: self.lrm.dtype)

    def check_latents(self, latents: torch.Tensor) -> None:
        self.lrm.check_latents(latents)

    def enable_autocast(self, dtype: torch.dtype | None) -> None:
        self.lrm.enable_autocast(dtype)

    def compile_blocks(self, **options) -> None:
        self.lrm.compile_blocks(**options)

    def features(self, latents, encoder_hidden_states, pooled_projections, timesteps):
        return self.lrm.features(latents, encoder_hidden_states, pooled_projections, timesteps)

    def forward(self, latents, encoder_hidden_states, pooled_projections, timesteps) -> torch.Tensor:
        out = self.features(latents, encoder_hidden_states, pooled_projections, timesteps)
        return self.reward_head(out.visual[-1], pooled_projections)

    def forward_ensemble(self, latents, encoder_hidden_states, pooled_projections, timesteps,
                         max_batch_items: int | None = None) -> torch.Tensor:
        """The mean cosine over the K noise levels of ``latents`` (K, B, C, H, W), one level per pass
        (``max_batch_items`` below B splits the batch too, as in :meth:`DiNaLRM.forward_ensemble`)."""
        latents = torch.stack(list(latents)) if not torch.is_tensor(latents) else latents
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(latents.shape[0], -1).expand(latents.shape[:2])
        bound = latents.shape[1] if max_batch_items is None else max_batch_items
        parts = [slice(i, i + bound) for i in range(0, latents.shape[1], bound)]
        return torch.cat([
            torch.stack([self(x[part], encoder_hidden_states[part], pooled_projections[part], t[part])
                         for x, t in zip(latents, timesteps)]).mean(0)
            for part in parts
        ])


def lrm_preference_step(
    model: PooledCosineLRM, batch: PreferenceBatch, sigma_table: SigmaTable, sampler: NoiseSampler, generator=None
) -> StepOutput:
    """Bradley-Terry on the temperature-scaled cosines; chosen and rejected share sigma and eps."""
    noise = draw_noise(sigma_table, sampler, batch.chosen.shape, generator)
    size = batch.chosen.shape[0]
    pair = add_noise(torch.cat([batch.chosen, batch.rejected]), noise.sigma.repeat(2), noise.noise.repeat(2, 1, 1, 1))
    cosines = model(pair, batch.encoder_hidden_states.repeat(2, 1, 1), batch.pooled_projections.repeat(2, 1), noise.timesteps.repeat(2))[:, 0]
    scaled = cosines * model.reward_head.logit_scale.clamp(max=math.log(100)).exp()
    loss = preference_loss("bt", scaled[:size], scaled[size:], noise.sigma, batch.target)
    return StepOutput(loss, cosines[:size].detach(), cosines[size:].detach(), noise.sigma)
