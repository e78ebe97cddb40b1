"""The toy world's text-to-image generator: a ``StableDiffusion3Pipeline`` at a CPU-sized config.

Same classes as SD3.5-M: ``AutoencoderKL`` (4x downsampling here), ``SD3Transformer2DModel`` with
dual-attention blocks, two ``CLIPTextModelWithProjection`` encoders (no T5: SD3 then feeds zeros in
T5's place) and ``FlowMatchEulerDiscreteScheduler``. The tokenizer is word-level over the
template vocabulary, built with ``tokenizers``.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from dina_lrm import vae_decode, vae_encode
from dina_lrm.testing.tiny_sd3 import sd3_transformer, small_vae
from dina_lrm_toyworld.config import ToyGeneratorConfig
from dina_lrm_toyworld.scenes import COLOURS, COUNT_WORDS, SHAPES, SIZES

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
T5_TOKENS = 4  # zero tokens in T5's slot (SD3 without T5): the prompt encoder's max_sequence_length


def vocabulary() -> list[str]:
    words = set(COUNT_WORDS.values()) | set(SIZES) | set(COLOURS) | {"to", "the", "left", "right", "of", "above", "below"}
    words |= set(SHAPES) | {shape + "s" for shape in SHAPES}
    return SPECIAL_TOKENS + sorted(words)


def build_tokenizer(max_length: int = 16) -> PreTrainedTokenizerFast:
    """Word-level: one id per template word, ``<bos> words <eos>``, padded with ``<pad>``."""
    vocab = {word: i for i, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=max_length,
    )


def _clip(config: ToyGeneratorConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.clip_width,
            intermediate_size=4 * config.clip_width,
            num_hidden_layers=config.clip_layers,
            num_attention_heads=4,
            projection_dim=config.clip_width,
            max_position_embeddings=config.max_prompt_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_toy_pipeline(config: ToyGeneratorConfig | None = None, seed: int = 0) -> StableDiffusion3Pipeline:
    """The untrained toy generator (deterministic for a seed)."""
    config = config or ToyGeneratorConfig()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(config.max_prompt_tokens)
    vae = small_vae(config.vae_channels, config.latent_channels, config.image_size, norm_num_groups=8, mid_block_add_attention=False)
    transformer = sd3_transformer(
        config.latent_size, config.latent_channels, config.hidden_size, 2 * config.clip_width, 2 * config.clip_width,
        pos_embed_max_size=config.latent_size // 2,
        num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        dual_attention_layers=config.dual_attention_layers,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=config.shift),
        vae=vae,
        text_encoder=_clip(config, tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_clip(config, tokenizer),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def images_to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Normalised latents ((mode - shift) * scale) of (N, 3, H, W) pixels in [-1, 1]."""
    return torch.cat([vae_encode(vae, (pixels[i : i + batch_size] + 1) / 2) for i in range(0, len(pixels), batch_size)])


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Normalised latents -> (N, H, W, 3) uint8 images."""
    return np.concatenate([tensor_to_images(vae_decode(vae, latents[i : i + batch_size]) * 2 - 1)
                           for i in range(0, len(latents), batch_size)])
