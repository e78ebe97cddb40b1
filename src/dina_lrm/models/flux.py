"""FLUX.1 backbone: the double-stream blocks of a diffusers ``FluxTransformer2DModel``.

The authors' FLUX reward model keeps ``x_embedder``, ``time_text_embed``, ``context_embedder``,
``pos_embed`` and the first N (all 19 in their release) double-stream blocks; no single-stream
block. It takes the SD3 call and applies FLUX's conventions inside:

* latents (B, 16, h, w) are packed into 2x2 patches, (B, h/2 * w/2, 64) with features in
  (channel, row, column) order, as ``FluxPipeline._pack_latents``; image ids are (0, row, col) and
  text ids all zero, concatenated text first for the rotary embedding;
* the time embedding reads sigma = timestep / 1000 and a constant guidance of 3.5, **not** scaled
  by 1000 as the stock ``FluxTransformer2DModel.forward`` does: the authors' model feeds them
  unscaled, and its scores depend on it.
"""

from __future__ import annotations

import torch
from torch import nn

from dina_lrm.models.backbone import BackboneOutput, check_kept_layers, dual_stream_flops, dual_stream_lora_targets, run_tapped

GUIDANCE = 3.5  # the constant guidance the authors' FLUX reward model embeds
UNADAPTED_BLOCKS = 4  # their LoRA exclusions, when they apply: every projection of blocks 0-3


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches, features in (channel, row, column) order."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def image_ids(rows: int, columns: int, device=None, dtype=None) -> torch.Tensor:
    """(rows * columns, 3) position ids (0, row, column) of the packed image tokens."""
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros(len(grid), 1), grid], dim=1).to(device=device, dtype=dtype)


class FluxBackbone(nn.Module):
    def __init__(self, transformer: nn.Module, num_layers: int, visual_taps: list[int], text_taps: list[int]):
        super().__init__()
        blocks = transformer.transformer_blocks
        check_kept_layers(len(blocks), num_layers, visual_taps, text_taps, "double-stream blocks")
        self.x_embedder = transformer.x_embedder
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.pos_embed = transformer.pos_embed
        self.transformer_blocks = nn.ModuleList(blocks[:num_layers])
        self.visual_taps = list(visual_taps)
        self.text_taps = list(text_taps)
        config = transformer.config
        self.hidden_size = config.num_attention_heads * config.attention_head_dim
        self.temb_dim = self.hidden_size
        self.latent_channels = config.in_channels // 4  # x_embedder reads 2x2-packed latents
        self.patch_size = self.latent_patch_size(config)
        self.text_width = config.joint_attention_dim
        self.pooled_width = config.pooled_projection_dim
        self.guidance_embeds = config.guidance_embeds
        self.gradient_checkpointing = False

    @staticmethod
    def latent_patch_size(config) -> int:
        return 2  # 2x2 packing, whatever the transformer's own patch_size (1)

    def lora_target_modules(self, exclude_last_text_stream: bool) -> tuple[list[str], list[str]]:
        """The authors' rule: every attention projection of every kept block when the last block's text
        output is tapped (their release); otherwise not the last block's text stream, nor blocks 0-3."""
        return dual_stream_lora_targets(len(self.transformer_blocks), exclude_last_text_stream, UNADAPTED_BLOCKS)

    def feature_tokens(self, image_tokens: int, text_tokens: int) -> tuple[int, int]:
        return image_tokens, text_tokens

    def flops(self, image_tokens: int, text_tokens: int) -> int:
        return dual_stream_flops(self, image_tokens, text_tokens)

    def time_embedding(self, timesteps: torch.Tensor, pooled_projections: torch.Tensor) -> torch.Tensor:
        """temb from sigma = t / 1000 and guidance 3.5, both unscaled (see the module docstring)."""
        sigma = timesteps.to(pooled_projections.dtype) / 1000
        if not self.guidance_embeds:
            return self.time_text_embed(sigma, pooled_projections)
        guidance = torch.full_like(sigma, GUIDANCE)
        return self.time_text_embed(sigma, guidance, pooled_projections)

    def forward(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> BackboneOutput:
        height, width = latents.shape[-2:]
        hidden = self.x_embedder(pack_latents(latents))
        temb = self.time_embedding(timesteps, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=latents.device, dtype=hidden.dtype)
        ids = torch.cat([text_ids, image_ids(height // 2, width // 2, latents.device, hidden.dtype)])
        rotary = self.pos_embed(ids)
        return run_tapped(self.transformer_blocks, self._step(temb, rotary), hidden, context, temb, self.visual_taps, self.text_taps)

    def _step(self, temb: torch.Tensor, rotary):
        def step(block, hidden, context):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(block, hidden, context, temb, rotary, use_reentrant=False)
            return block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary)

        return step
