"""The mid-size models the CPU benchmarks share, one per backbone.

Hidden 384 (6 heads of 64), 6 kept blocks of 8, 16 latent channels, 32x32 latents (256 image tokens),
109 text tokens of width 512: the shapes of SD3.5-M at a size two CPU cores run, and the same sizes
for FLUX (double-stream blocks), Z-Image (single-stream layers after 2+2 refiners; 256-wide time
embedding) and Qwen-Image (dual-stream blocks). Z-Image and Qwen-Image take a text mask (all ones
here) in the place of the pooled embedding.
"""

from __future__ import annotations

import torch

LATENT_SHAPE = (16, 32, 32)
TEXT_TOKENS, TEXT_WIDTH, POOLED_WIDTH = 109, 512, 256
BACKBONES = ("sd3", "flux", "zimage", "qwenimage")
TAPS = {"num_transformer_layers": 6, "visual_head_idx": [2, 4, 6], "text_head_idx": [2, 4, 6]}
MODEL_IDS = {"sd3": "stabilityai/stable-diffusion-3.5-medium", "flux": "black-forest-labs/FLUX.1-dev",
             "zimage": "Tongyi-MAI/Z-Image-Turbo", "qwenimage": "Qwen/Qwen-Image"}


def _transformer(backbone: str):
    import diffusers

    if backbone == "sd3":
        return diffusers.SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=64,
            num_attention_heads=6, joint_attention_dim=TEXT_WIDTH, caption_projection_dim=384, pooled_projection_dim=POOLED_WIDTH,
            qk_norm="rms_norm", dual_attention_layers=tuple(range(6)), pos_embed_max_size=64)
    if backbone == "flux":
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=8, num_single_layers=2, attention_head_dim=64, num_attention_heads=6,
            joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=POOLED_WIDTH, guidance_embeds=True, axes_dims_rope=(8, 28, 28))
    if backbone == "zimage":
        return diffusers.ZImageTransformer2DModel(
            in_channels=16, dim=384, n_layers=8, n_refiner_layers=2, n_heads=6, n_kv_heads=6, cap_feat_dim=TEXT_WIDTH,
            axes_dims=[16, 24, 24], axes_lens=[512, 64, 64])
    if backbone == "qwenimage":
        return diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=8, attention_head_dim=64, num_attention_heads=6,
            joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(8, 28, 28))
    raise ValueError(f"unknown backbone {backbone!r}; choose from {BACKBONES}")


def build_model(seed: int = 0, backbone: str = "sd3", **model_overrides):
    from dina_lrm import DiNaConfig, DiNaLRM

    torch.manual_seed(seed)
    config = DiNaConfig.from_dict({"model": {**TAPS, "backbone_model_id": MODEL_IDS[backbone], **model_overrides}})
    return DiNaLRM(config, _transformer(backbone))


def text_inputs(batch: int, generator: torch.Generator, backbone: str = "sd3") -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_hidden_states, pooled_projections), or the text mask for Z-Image / Qwen-Image."""
    states = torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH, generator=generator)
    if backbone in ("zimage", "qwenimage"):
        return states, torch.ones(batch, TEXT_TOKENS)
    return states, torch.randn(batch, POOLED_WIDTH, generator=generator)


CLIP_WIDTH, T5_TOKENS = 128, TEXT_TOKENS - 77  # the SD3 text sequence: 77 CLIP tokens, then T5's


def sd3_prompt_encoder(t5_layers: int, seed: int = 0):
    """SD3 text conditioning at the mid size: two CLIPs (width 128, pooled 2 x 128) and a T5 of
    width 512 with ``t5_layers`` layers (its depth sets the text encoders' share of the cost)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from dina_lrm.models.sd3_text import SD3PromptEncoder
    from dina_lrm.testing.tiny_sd3 import clip_tokenizer, t5_tokenizer

    torch.manual_seed(seed)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip = dict(vocab_size=len(clip_tok), hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH, num_hidden_layers=4,
                num_attention_heads=2, projection_dim=POOLED_WIDTH // 2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=TEXT_WIDTH, d_kv=64, d_ff=4096, num_layers=t5_layers, num_heads=8,
                                 feed_forward_proj="gated-gelu"))
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**clip)), CLIPTextModelWithProjection(CLIPTextConfig(**clip)), t5]
    return SD3PromptEncoder([clip_tok, clip_tok, t5_tok], encoders, max_sequence_length=T5_TOKENS, joint_attention_dim=TEXT_WIDTH)


def text_flops(encoder) -> int:
    """FLOPs to encode one prompt with ``encoder`` (an SD3PromptEncoder), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder.encode(["a prompt"])
    return counter.get_total_flops()


def save_pipeline(directory, t5_layers: int = 2, seed: int = 0):
    """A mid-size SD3 pipeline (the transformer of :func:`build_model`, the text encoders of
    :func:`sd3_prompt_encoder`, a 4-level VAE) written with ``save_pretrained``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from dina_lrm.testing.tiny_sd3 import small_vae

    torch.manual_seed(seed)
    text = sd3_prompt_encoder(t5_layers, seed)
    vae = small_vae((32, 64, 64, 64), LATENT_SHAPE[0], 8 * LATENT_SHAPE[1], norm_num_groups=8, shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(
        transformer=_transformer("sd3"), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text.text_encoders[0], tokenizer=text.tokenizers[0], text_encoder_2=text.text_encoders[1],
        tokenizer_2=text.tokenizers[1], text_encoder_3=text.text_encoders[2], tokenizer_3=text.tokenizers[2])
    pipe.save_pretrained(directory)
    return pipe
