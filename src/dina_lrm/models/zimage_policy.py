"""Z-Image as a policy: ``ZImagePipeline``'s call (a list of (C, 1, h, w) latents, time 1 - sigma,
each caption's unpadded tokens), its negated output, its guidance and its shifted schedule.

Guidance follows the pipeline: with a scale g > 0 the prediction is ``pos + g (pos - neg)`` (so g = 0,
Z-Image-Turbo's setting, is one conditional pass); its optional CFG renormalisation and truncation
are off, as by default.
"""

from __future__ import annotations

import torch

from dina_lrm.models.policy import Policy, transformer_dtype


class ZImagePolicy(Policy):
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]  # the authors' Z-Image LoRA list
    default_guidance = 5.0

    def guided(self, guidance_scale: float) -> bool:
        return guidance_scale > 0

    def conditional_scale(self, guidance_scale: float) -> float:
        return 0.0

    def guide(self, conditional, unconditional, guidance_scale):
        return conditional + guidance_scale * (conditional - unconditional)

    def forward(self, transformer, latents, sigmas, states, pooled, guidance_scale):
        dtype = transformer_dtype(transformer)
        mask = pooled > 0.5
        captions = [states[i][mask[i]].to(dtype) for i in range(len(states))]
        frames = list(latents.to(dtype).unsqueeze(2).unbind(0))
        out = transformer(frames, 1 - sigmas, captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)
