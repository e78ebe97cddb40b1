"""Tiny SD3-architecture components, built from configs in code.

The same diffusers / transformers classes as Stable Diffusion 3.5 (``SD3Transformer2DModel`` with
dual-attention blocks, ``AutoencoderKL``, two CLIP text encoders with projection, T5 encoder,
``FlowMatchEulerDiscreteScheduler``) at a size a laptop CPU runs in milliseconds. The
tokenizers are character-level, so they need no downloaded vocabulary.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

CHARACTERS = string.ascii_lowercase + string.digits + ".,'-!?"


@dataclass
class TinySD3Config:
    num_layers: int = 4
    dual_attention_layers: tuple[int, ...] = (0, 1, 2)
    attention_head_dim: int = 8
    num_attention_heads: int = 4
    latent_channels: int = 4
    text_width: int = 32  # T5 d_model = transformer joint_attention_dim
    clip_width: int = 16  # each CLIP hidden size; 2 * clip_width must not exceed text_width
    clip_projection: int = 32  # each CLIP projection; pooled width = 2 * clip_projection
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # 4 levels: 8x downsampling, as SD3's VAE
    image_size: int = 64
    shift: float = 3.0
    extra: dict = field(default_factory=dict)  # more SD3Transformer2DModel kwargs

    @property
    def hidden_size(self) -> int:
        return self.attention_head_dim * self.num_attention_heads


def clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in CHARACTERS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARACTERS] + [("\u2581" + c, -2.5) for c in CHARACTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_encoder(config: TinySD3Config, vocab_size: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=config.clip_width,
            intermediate_size=2 * config.clip_width,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=config.clip_projection,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def sd3_transformer(latent_size: int, latent_channels: int, hidden_size: int, text_width: int, pooled_width: int,
                    pos_embed_max_size: int, **kwargs) -> SD3Transformer2DModel:
    """An ``SD3Transformer2DModel`` with patch size 2 and RMS q/k norm, as SD3.5-M."""
    return SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        joint_attention_dim=text_width,
        caption_projection_dim=hidden_size,
        pooled_projection_dim=pooled_width,
        qk_norm="rms_norm",
        pos_embed_max_size=pos_embed_max_size,
        **kwargs,
    )


def small_vae(block_out_channels: tuple[int, ...], latent_channels: int, image_size: int, **kwargs) -> AutoencoderKL:
    """An ``AutoencoderKL`` with one ResNet layer per level; downsampling 2^(levels - 1)."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        sample_size=image_size,
        **kwargs,
    )


def build_tiny_sd3_pipeline(config: TinySD3Config | None = None, seed: int = 0) -> StableDiffusion3Pipeline:
    """A randomly initialised SD3 pipeline of the given tiny size (deterministic for a seed)."""
    config = config or TinySD3Config()
    if 2 * config.clip_width > config.text_width:
        raise ValueError("2 * clip_width must not exceed text_width (CLIP states are padded to the T5 width)")
    torch.manual_seed(seed)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = sd3_transformer(
        config.image_size // 8, config.latent_channels, config.hidden_size, config.text_width, 2 * config.clip_projection,
        pos_embed_max_size=max(32, config.image_size // 8),
        num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        dual_attention_layers=config.dual_attention_layers,
        **config.extra,
    )
    vae = small_vae(
        config.vae_channels, config.latent_channels, config.image_size,
        norm_num_groups=min(8, config.vae_channels[0]), shift_factor=0.0609, scaling_factor=1.5305,
    )
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), d_model=config.text_width, d_kv=8, d_ff=2 * config.text_width,
                 num_layers=2, num_heads=config.text_width // 8)
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=config.shift),
        vae=vae,
        text_encoder=_clip_encoder(config, len(clip_tok)),
        tokenizer=clip_tok,
        text_encoder_2=_clip_encoder(config, len(clip_tok)),
        tokenizer_2=clip_tok,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


def save_tiny_sd3_pipeline(directory: str | Path, config: TinySD3Config | None = None, seed: int = 0) -> Path:
    """Build and ``save_pretrained`` a tiny pipeline; load it back with ``StableDiffusion3Pipeline.from_pretrained``."""
    directory = Path(directory)
    build_tiny_sd3_pipeline(config, seed).save_pretrained(str(directory))
    return directory
