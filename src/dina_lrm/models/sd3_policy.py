"""SD3 / SD3.5 as a policy: ``StableDiffusion3Pipeline``'s transformer call, guidance and schedule."""

from __future__ import annotations


from dina_lrm.models.policy import MMDIT_LORA_TARGETS, Policy, Schedule, shift_mu, transformer_dtype


class SD3Policy(Policy):
    # the LoRA of flow_grpo's and the DiNa-LRM authors' SD3.5 recipes: both streams' attention, not attn2
    lora_targets = MMDIT_LORA_TARGETS
    default_guidance = 7.0

    def schedule(self, num_steps: int, latent_shape) -> Schedule:
        kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = shift_mu(self.scheduler, self.image_tokens(latent_shape), max_shift=1.16)
        return Schedule.from_scheduler(self.scheduler, num_steps, **kwargs)

    def forward(self, transformer, latents, sigmas, states, pooled, guidance_scale):
        dtype = transformer_dtype(transformer)
        timesteps = sigmas * self.scheduler.config.num_train_timesteps
        return transformer(hidden_states=latents.to(dtype), encoder_hidden_states=states.to(dtype), pooled_projections=pooled.to(dtype),
                           timestep=timesteps, return_dict=False)[0].float()
