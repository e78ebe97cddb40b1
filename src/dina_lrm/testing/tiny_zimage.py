"""A tiny ZImagePipeline built from configs in code (the same diffusers / transformers classes as
Z-Image-Turbo: a Qwen3 text encoder read in its chat template), with the character-level tokenizer
of the tiny SD3 pipeline. The width (272) exceeds Z-Image's 256-wide time embedding, as at scale."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from dina_lrm.testing.tiny_sd3 import small_vae, t5_tokenizer

TINY_ZIMAGE = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=272, n_layers=3, n_refiner_layers=1, n_heads=17,
                   n_kv_heads=17, cap_feat_dim=24, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking %}<think>{% endif %}{% endif %}")


def tiny_qwen3_tokenizer():
    tokenizer = t5_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_zimage_pipeline(seed: int = 0) -> ZImagePipeline:
    torch.manual_seed(seed)
    tokenizer = tiny_qwen3_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=12, max_position_embeddings=256))
    vae = small_vae((8, 16, 16, 16), 4, 64, norm_num_groups=8, shift_factor=0.1159, scaling_factor=0.3611)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=ZImageTransformer2DModel(**TINY_ZIMAGE))
