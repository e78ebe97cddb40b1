"""Qwen-Image backbone: the first N dual-stream blocks of a diffusers ``QwenImageTransformer2DModel``.

The authors' Qwen-Image reward model keeps ``img_in``, ``txt_norm``, ``txt_in``, ``time_text_embed``,
``pos_embed`` and the first N of the 60 blocks (they publish no config or checkpoint for it). It takes
the SD3 call and applies Qwen-Image's conventions inside:

* latents (B, 16, h, w) - or as the video VAE gives them, (B, 16, 1, h, w) - normalised per channel
  by the VAE's ``latents_mean`` / ``latents_std``, packed into 2x2 patches like FLUX;
* the stock time handling: sigma = t / 1000 goes in, the embedding scales it by 1000 itself; no
  pooled text, no guidance;
* the text mask (in the place of ``pooled_projections``) reaches every block, and the rotary text
  positions follow the image's, as ``QwenImageTransformer2DModel.forward`` builds them. The head
  ignores the padded text tokens, so a prompt scores the same alone or in any batch.
"""

from __future__ import annotations

import torch
from torch import nn

from dina_lrm.models.backbone import BackboneOutput, check_kept_layers, dual_stream_flops, dual_stream_lora_targets, run_tapped
from dina_lrm.models.flux import pack_latents

class QwenImageBackbone(nn.Module):
    video_latents = True  # also takes the video VAE's (B, C, 1, h, w)

    def __init__(self, transformer: nn.Module, num_layers: int, visual_taps: list[int], text_taps: list[int]):
        super().__init__()
        blocks = transformer.transformer_blocks
        check_kept_layers(len(blocks), num_layers, visual_taps, text_taps, "dual-stream blocks")
        self.img_in = transformer.img_in
        self.txt_norm = transformer.txt_norm
        self.txt_in = transformer.txt_in
        self.time_text_embed = transformer.time_text_embed
        self.pos_embed = transformer.pos_embed
        self.transformer_blocks = nn.ModuleList(blocks[:num_layers])
        self.visual_taps = list(visual_taps)
        self.text_taps = list(text_taps)
        config = transformer.config
        self.hidden_size = config.num_attention_heads * config.attention_head_dim
        self.temb_dim = self.hidden_size
        self.latent_channels = config.in_channels // 4
        self.patch_size = self.latent_patch_size(config)
        self.text_width = config.joint_attention_dim
        self.pooled_width = None  # pooled_projections carries the text mask
        self.gradient_checkpointing = False

    @staticmethod
    def latent_patch_size(config) -> int:
        return config.patch_size

    def lora_target_modules(self, exclude_last_text_stream: bool) -> tuple[list[str], list[str]]:
        """The authors' rule: every attention projection, but not the last block's text stream unless
        the text output of the last block is tapped."""
        return dual_stream_lora_targets(len(self.transformer_blocks), exclude_last_text_stream)

    def feature_tokens(self, image_tokens: int, text_tokens: int) -> tuple[int, int]:
        return image_tokens, text_tokens

    def flops(self, image_tokens: int, text_tokens: int) -> int:
        return dual_stream_flops(self, image_tokens, text_tokens)

    def forward(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> BackboneOutput:
        """``pooled_projections``: the text mask (B, tokens) of ``encoder_hidden_states``."""
        mask = pooled_projections > 0.5
        if not bool(mask.any(dim=1).all()):
            raise ValueError("a Qwen-Image text mask selects no token for some prompt")
        tokens = int(mask.sum(dim=1).max())  # the pipeline pads a batch to its longest prompt
        mask, states = mask[:, :tokens], encoder_hidden_states[:, :tokens]
        if latents.dim() == 5:
            latents = latents[:, :, 0]
        height, width = latents.shape[-2:]
        hidden = self.img_in(pack_latents(latents.to(states.dtype)))
        temb = self.time_text_embed((timesteps / 1000).to(hidden.dtype), hidden)
        context = self.txt_in(self.txt_norm(states))
        shapes = [(1, height // 2, width // 2)] * len(latents)
        rotary = self.pos_embed(shapes, max_txt_seq_len=tokens, device=hidden.device)
        out = run_tapped(self.transformer_blocks, self._step(mask, temb, rotary), hidden, context, temb, self.visual_taps, self.text_taps)
        out.text_mask = mask
        return out

    def _step(self, mask: torch.Tensor, temb: torch.Tensor, rotary):
        def step(block, hidden, context):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(block, hidden, context, mask, temb, rotary, use_reentrant=False)
            return block(hidden_states=hidden, encoder_hidden_states=context, encoder_hidden_states_mask=mask, temb=temb,
                         image_rotary_emb=rotary)

        return step
