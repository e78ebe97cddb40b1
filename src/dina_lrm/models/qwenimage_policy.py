"""Qwen-Image as a policy: ``QwenImagePipeline``'s packing, image shapes, text mask, true CFG with
its norm rescale, and its shifted schedule.

Latents are the unpacked (B, 16, h, w) form (the video VAE's frame axis dropped, as the reward model
reads them). Guidance is the pipeline's ``true_cfg_scale``: for g > 1, ``neg + g (pos - neg)`` rescaled
per token to the norm of ``pos``.
"""

from __future__ import annotations


from dina_lrm.models.flux import pack_latents
from dina_lrm.models.flux_policy import unpack_latents
from dina_lrm.models.policy import MMDIT_LORA_TARGETS, Policy, transformer_dtype


class QwenImagePolicy(Policy):
    lora_targets = MMDIT_LORA_TARGETS
    default_guidance = 4.0

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.in_channels // 4

    def guide(self, conditional, unconditional, guidance_scale):
        height, width = conditional.shape[-2:]
        positive = pack_latents(conditional)
        combined = pack_latents(unconditional + guidance_scale * (conditional - unconditional))
        rescaled = combined * (positive.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        return unpack_latents(rescaled, height, width)

    def forward(self, transformer, latents, sigmas, states, pooled, guidance_scale):
        dtype = transformer_dtype(transformer)
        height, width = latents.shape[-2:]
        tokens = int(pooled.sum(dim=1).max())  # the pipeline passes each batch's embeddings cut to its longest prompt
        out = transformer(hidden_states=pack_latents(latents).to(dtype), timestep=sigmas, guidance=None,
                          encoder_hidden_states_mask=pooled[:, :tokens].to(dtype), encoder_hidden_states=states[:, :tokens].to(dtype),
                          img_shapes=[[(1, height // 2, width // 2)]] * len(latents), return_dict=False)[0]
        return unpack_latents(out.float(), height, width)
