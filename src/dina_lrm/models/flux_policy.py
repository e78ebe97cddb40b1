"""FLUX.1 as a policy: ``FluxPipeline``'s packing, ids, embedded guidance and shifted schedule.

The guidance scale is FLUX.1-dev's *embedded* guidance (the pipeline's ``guidance_scale``, 3.5 by
default), given to the transformer with every pass; there is no negative-prompt pass (the pipeline's
``true_cfg_scale`` is not used by the published alignment recipes). A transformer without guidance
embeddings (FLUX.1-schnell) ignores it.
"""

from __future__ import annotations

import torch

from dina_lrm.models.flux import image_ids, pack_latents
from dina_lrm.models.policy import MMDIT_LORA_TARGETS, Policy, transformer_dtype


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`dina_lrm.models.flux.pack_latents`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    batch, _, features = packed.shape
    channels = features // 4
    patches = packed.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


class FluxPolicy(Policy):
    lora_targets = MMDIT_LORA_TARGETS
    default_guidance = 3.5

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.in_channels // 4

    def guided(self, guidance_scale: float) -> bool:
        return False

    def conditional_scale(self, guidance_scale: float) -> float:
        return guidance_scale

    def forward(self, transformer, latents, sigmas, states, pooled, guidance_scale):
        dtype = transformer_dtype(transformer)
        height, width = latents.shape[-2:]
        guidance = None
        if self.transformer_config.guidance_embeds:
            guidance = torch.full((latents.shape[0],), float(guidance_scale), device=latents.device)
        out = transformer(hidden_states=pack_latents(latents).to(dtype), timestep=sigmas, guidance=guidance,
                          pooled_projections=pooled.to(dtype), encoder_hidden_states=states.to(dtype),
                          txt_ids=torch.zeros(states.shape[1], 3, device=latents.device, dtype=dtype),
                          img_ids=image_ids(height // 2, width // 2, latents.device, dtype), return_dict=False)[0]
        return unpack_latents(out.float(), height, width)
