"""SD3 / SD3.5 backbone: the first N joint blocks of a diffusers ``SD3Transformer2DModel``."""

from __future__ import annotations

import torch
from torch import nn

from dina_lrm.models.backbone import BackboneOutput, check_kept_layers, dual_stream_flops, dual_stream_lora_targets, run_tapped

class SD3Backbone(nn.Module):
    """Patch, time+pooled-text and context embeddings plus the first ``num_layers`` joint blocks.

    The module names (``pos_embed``, ``time_text_embed``, ``context_embedder``,
    ``transformer_blocks``) are the release's, so its PEFT adapter keys load unchanged.
    """

    def __init__(self, transformer: nn.Module, num_layers: int, visual_taps: list[int], text_taps: list[int]):
        super().__init__()
        blocks = transformer.transformer_blocks
        check_kept_layers(len(blocks), num_layers, visual_taps, text_taps)
        if text_taps and text_taps[-1] > 0 and blocks[text_taps[-1] - 1].context_pre_only:
            raise ValueError(
                f"text tap {text_taps[-1]} reads block {text_taps[-1] - 1}, the transformer's last block, "
                "which outputs no text stream; tap an earlier block"
            )
        self.pos_embed = transformer.pos_embed
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.transformer_blocks = nn.ModuleList(blocks[:num_layers])
        self.visual_taps = list(visual_taps)
        self.text_taps = list(text_taps)
        config = transformer.config
        self.hidden_size = config.num_attention_heads * config.attention_head_dim
        self.temb_dim = self.hidden_size
        self.latent_channels = config.in_channels
        self.patch_size = config.patch_size
        self.text_width = config.joint_attention_dim
        self.pooled_width = config.pooled_projection_dim
        self.gradient_checkpointing = False

    @staticmethod
    def latent_patch_size(config) -> int:
        return config.patch_size

    def lora_target_modules(self, exclude_last_text_stream: bool) -> tuple[list[str], list[str]]:
        return dual_stream_lora_targets(len(self.transformer_blocks), exclude_last_text_stream)

    def feature_tokens(self, image_tokens: int, text_tokens: int) -> tuple[int, int]:
        return image_tokens, text_tokens

    def flops(self, image_tokens: int, text_tokens: int) -> int:
        convolution = 2 * image_tokens * self.latent_channels * self.patch_size**2 * self.hidden_size  # the patch embedding
        return dual_stream_flops(self, image_tokens, text_tokens) + convolution

    def forward(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> BackboneOutput:
        hidden = self.pos_embed(latents).contiguous()
        temb = self.time_text_embed(timesteps, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        return run_tapped(self.transformer_blocks, self._step(temb), hidden, context, temb, self.visual_taps, self.text_taps)

    def _step(self, temb: torch.Tensor):
        def step(block, hidden, context):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(block, hidden, context, temb, use_reentrant=False)
            return block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)

        return step
