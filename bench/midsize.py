"""The mid-size SD3-shaped model the CPU benchmarks share.

Hidden 384, 6 kept joint blocks with dual attention (of 8), 16 latent channels, 32x32 latents
(256 image tokens), 109 text tokens of width 512: the shapes of SD3.5-M at a size two CPU cores run.
"""

from __future__ import annotations

import torch

LATENT_SHAPE = (16, 32, 32)
TEXT_TOKENS, TEXT_WIDTH, POOLED_WIDTH = 109, 512, 256


def build_model(seed: int = 0, **model_overrides):
    from diffusers import SD3Transformer2DModel

    from dina_lrm import DiNaConfig, DiNaLRM

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=64,
        num_attention_heads=6, joint_attention_dim=TEXT_WIDTH, caption_projection_dim=384, pooled_projection_dim=POOLED_WIDTH,
        qk_norm="rms_norm", dual_attention_layers=tuple(range(6)), pos_embed_max_size=64,
    )
    config = DiNaConfig.from_dict({"model": {"num_transformer_layers": 6, "visual_head_idx": [2, 4, 6],
                                             "text_head_idx": [2, 4, 6], **model_overrides}})
    return DiNaLRM(config, transformer)


def text_inputs(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH, generator=generator), torch.randn(batch, POOLED_WIDTH, generator=generator)
