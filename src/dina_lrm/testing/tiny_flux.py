"""A tiny FluxPipeline built from configs in code (the same diffusers / transformers classes as
FLUX.1-dev), with the character-level tokenizers of the tiny SD3 pipeline."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from dina_lrm.testing.tiny_sd3 import clip_tokenizer, small_vae, t5_tokenizer

TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=3, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    vae = small_vae((8, 16, 16, 16), 4, 64, norm_num_groups=8, shift_factor=0.1159, scaling_factor=0.3611)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=FluxTransformer2DModel(**TINY_FLUX))
