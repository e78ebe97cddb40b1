"""A tiny QwenImagePipeline built from configs in code (the same diffusers / transformers classes as
Qwen-Image: a Qwen2.5-VL text encoder, the video VAE with per-channel latent statistics), with the
character-level tokenizer of the tiny SD3 pipeline."""

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from dina_lrm.testing.tiny_sd3 import t5_tokenizer

TINY_QWENIMAGE = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def build_tiny_qwenimage_pipeline(seed: int = 0) -> QwenImagePipeline:
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0])
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
                                 latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=QwenImageTransformer2DModel(**TINY_QWENIMAGE))
