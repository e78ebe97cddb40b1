"""The policy interface: how alignment and search drive a generator's own transformer.

A policy adapter turns prompts into its pipeline's text conditioning, returns the velocity of
*unpacked* latents (B, C, h, w) at noise level sigma in the rectified-flow convention
``v = eps - x0`` (whatever the transformer's own packing, timestep scale and sign), applies guidance
as its pipeline does, builds the sampling schedule its pipeline uses, and names the attention
projections the published alignment recipes put a policy LoRA on. Samplers, ReFL, Flow-GRPO,
DiffusionNFT and reward-guided search are written once against it. One file per generator family
(``sd3_policy.py``, ``flux_policy.py``, ...), registered beside its backbone in ``models/backbones.py``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from dina_lrm.data.images import vae_scale_factor
from dina_lrm.models.backbones import latent_patch_size, prompt_encoder_for


@dataclass
class TextConditioning:
    states: torch.Tensor  # (B, L, D) prompt embeddings
    pooled: torch.Tensor  # (B, P) pooled embedding, or the text mask (B, L) for generators without one
    negative_states: torch.Tensor  # (B, L, D) the negative (unconditional) prompt's, for guidance
    negative_pooled: torch.Tensor

    def repeat(self, times: int) -> TextConditioning:
        return TextConditioning(*(t.repeat_interleave(times, dim=0) for t in self.tensors()))

    def index(self, index) -> TextConditioning:
        return TextConditioning(*(t[index] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.states, self.pooled, self.negative_states, self.negative_pooled


@dataclass
class Schedule:
    sigmas: torch.Tensor  # (T + 1,) from (near) 1 down to 0
    timesteps: torch.Tensor  # (T,) the scheduler's timesteps (sigma x num_train_timesteps)

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, **kwargs) -> Schedule:
        """``scheduler.set_timesteps(num_steps, **kwargs)`` on a copy (the pipeline's stays untouched)."""
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(num_steps, **kwargs)
        return cls(scheduler.sigmas.double().cpu(), scheduler.timesteps.float().cpu())

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def sigma_below_one(self) -> float:
        return float(self.sigmas[self.sigmas < 1].max())


def shift_mu(scheduler, image_tokens: int, max_shift: float = 1.15) -> float:
    """The resolution-dependent shift ``mu`` of a dynamically shifted flow-matching schedule."""
    config = scheduler.config
    return calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", max_shift))


def linear_sigmas(num_steps: int) -> np.ndarray:
    """FLUX, Qwen-Image and Z-Image's sampling sigmas before shifting: 1 down to 1/T."""
    return np.linspace(1.0, 1 / num_steps, num_steps)


def batch_sigmas(sigma, latents: torch.Tensor) -> torch.Tensor:
    """sigma (a number or (B,)) as a float32 (B,) tensor on the latents' device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
    return sigma.expand(latents.shape[0]) if sigma.dim() == 0 else sigma


# the published recipes' policy LoRA on a dual-stream (MMDiT) block: both streams' attention projections
MMDIT_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                      "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


class Policy(ABC):
    """Shared machinery; a subclass gives ``forward`` (one transformer pass) and, where its pipeline
    guides differently from ``v_u + g (v_c - v_u)`` for g > 1, ``guide``."""

    lora_targets: list[str]  # the attention projections of the published policy LoRA recipes
    default_guidance: float  # the pipeline's own default guidance scale

    def __init__(self, pipe, max_sequence_length: int | None = None):
        if pipe.transformer is None or getattr(pipe, "scheduler", None) is None:
            raise ValueError("a policy needs the pipeline's transformer and scheduler")
        self.scheduler = pipe.scheduler
        self.vae = pipe.vae
        self.transformer_config = pipe.transformer.config
        encoder = prompt_encoder_for(pipe.transformer)
        kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        self.prompt_encoder = encoder.from_pipeline(pipe, **kwargs)
        self.patch = latent_patch_size(pipe.transformer)
        if "FlowMatch" not in type(self.scheduler).__name__:
            raise ValueError(f"the policy's scheduler is a {type(self.scheduler).__name__}; alignment and search sample "
                             "rectified-flow generators with a flow-matching scheduler")

    # Text -------------------------------------------------------------------------------------

    def encode(self, prompts: list[str], negative_prompt: str = "") -> TextConditioning:
        states, pooled = self.prompt_encoder(list(prompts))
        negative, negative_pooled = self.prompt_encoder([negative_prompt])
        batch = len(prompts)
        return TextConditioning(states, pooled, negative.expand(batch, *negative.shape[1:]), negative_pooled.expand(batch, *negative_pooled.shape[1:]))

    # Shapes and schedules ---------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.transformer_config.in_channels

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int]:
        """(C, h, w) of a square image ``resolution`` pixels wide (default: the transformer's native size)."""
        factor = vae_scale_factor(self.vae) if self.vae is not None else 8
        if resolution is None:
            side = self.native_latent_side()
        else:
            if resolution % (factor * self.patch):
                raise ValueError(f"resolution {resolution} must be a multiple of {factor * self.patch} (VAE factor x patch size)")
            side = resolution // factor
        return (self.latent_channels, side, side)

    def native_latent_side(self) -> int:
        return getattr(self.transformer_config, "sample_size", None) or 128

    def image_tokens(self, latent_shape) -> int:
        return (latent_shape[-2] // self.patch) * (latent_shape[-1] // self.patch)

    def schedule(self, num_steps: int, latent_shape) -> Schedule:
        """The sampling schedule the pipeline uses for ``num_steps`` steps at this latent size."""
        return Schedule.from_scheduler(self.scheduler, num_steps, sigmas=linear_sigmas(num_steps),
                                       mu=shift_mu(self.scheduler, self.image_tokens(latent_shape)))

    # Velocities -------------------------------------------------------------------------------

    @abstractmethod
    def forward(self, transformer, latents: torch.Tensor, sigmas: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor,
                guidance_scale: float) -> torch.Tensor:
        """One transformer pass: (B, C, h, w) latents at sigmas (B,) -> v = eps - x0, float32."""

    def guided(self, guidance_scale: float) -> bool:
        """Whether the pipeline runs a second, negative-prompt pass at this scale."""
        return guidance_scale > 1

    def conditional_scale(self, guidance_scale: float) -> float:
        """The scale of one conditional pass (no negative prompt) that keeps what else ``guidance_scale``
        sets (FLUX's embedded guidance)."""
        return 1.0

    def guide(self, conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        return unconditional + guidance_scale * (conditional - unconditional)

    def velocity(self, transformer, latents: torch.Tensor, sigma, text: TextConditioning, guidance_scale: float) -> torch.Tensor:
        """The guided velocity at noise level ``sigma`` (a number or (B,)), one batched pass."""
        sigmas = batch_sigmas(sigma, latents)
        if not self.guided(guidance_scale):
            return self.forward(transformer, latents, sigmas, text.states, text.pooled, guidance_scale)
        both = self.forward(transformer, torch.cat([latents, latents]), torch.cat([sigmas, sigmas]),
                            torch.cat([text.negative_states, text.states]), torch.cat([text.negative_pooled, text.pooled]),
                            guidance_scale)
        unconditional, conditional = both.chunk(2)
        return self.guide(conditional, unconditional, guidance_scale)


def transformer_dtype(transformer) -> torch.dtype:
    return next(transformer.parameters()).dtype
