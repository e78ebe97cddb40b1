"""The backbone interface: features and temb from latents, text embeddings and timesteps.

A backbone keeps the patch/text/time embeddings and the first N blocks of a generator's own
transformer and returns the token streams after the tapped blocks. Every backbone takes the SD3
call: unpacked VAE latents (B, C, h, w), the pipeline's text embeddings and timesteps on the
scheduler's 0-1000 scale, and applies its own conventions inside. Generators without a pooled text
embedding (Z-Image, Qwen-Image) take their text attention mask (B, tokens) in its place
(``pooled_width is None``), so every caller passes two text tensors whatever the backbone. Adding one means one new file
with a class that follows :class:`Backbone` and one entry in ``models/backbones.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn


@dataclass
class BackboneOutput:
    temb: torch.Tensor  # (B, temb_dim): the time (+ pooled-text) embedding the blocks are modulated by
    visual: list[torch.Tensor]  # per visual tap: (B, N_image_tokens, D)
    text: list[torch.Tensor]  # per text tap: (B, N_text_tokens, D)
    text_mask: torch.Tensor | None = None  # (B, N_text_tokens) bool, False on padding that fills out a batch

    def to(self, dtype: torch.dtype) -> BackboneOutput:
        """The features and temb in ``dtype`` (the mask stays boolean)."""
        return BackboneOutput(self.temb.to(dtype), [t.to(dtype) for t in self.visual], [t.to(dtype) for t in self.text], self.text_mask)

    def chunk(self, parts: int) -> list[BackboneOutput]:
        """Split along the batch into ``parts`` equal outputs (undoes a concatenated batch)."""
        temb = self.temb.chunk(parts)
        visual = [t.chunk(parts) for t in self.visual]
        text = [t.chunk(parts) for t in self.text]
        masks = [None] * parts if self.text_mask is None else self.text_mask.chunk(parts)
        return [
            BackboneOutput(temb[i], [v[i] for v in visual], [t[i] for t in text], masks[i]) for i in range(parts)
        ]


class Backbone(Protocol):
    hidden_size: int  # width of the tapped tokens
    temb_dim: int  # width of BackboneOutput.temb
    text_width: int  # width of encoder_hidden_states
    pooled_width: int | None  # width of pooled_projections; None: that input is the text mask (B, tokens)
    latent_channels: int
    patch_size: int
    visual_taps: list[int]
    text_taps: list[int]

    def __call__(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,  # or the text mask, when pooled_width is None
        timesteps: torch.Tensor,
    ) -> BackboneOutput: ...

    def __init__(self, transformer: nn.Module, num_layers: int, visual_taps: list[int], text_taps: list[int]) -> None:
        """Keep ``transformer``'s embeddings and first ``num_layers`` blocks (shared, not copied)."""
        ...

    @staticmethod
    def latent_patch_size(config) -> int:
        """Latent sides must be multiples of this (from the transformer's config)."""
        ...

    def lora_target_modules(self, exclude_last_text_stream: bool) -> tuple[list[str], list[str]]: ...

    def flops(self, image_tokens: int, text_tokens: int) -> int:
        """Analytic FLOPs of one pass over one image (multiply-add = 2; LoRA included)."""
        ...

    def feature_tokens(self, image_tokens: int, text_tokens: int) -> tuple[int, int]:
        """How many image and text tokens the tapped features hold (Z-Image pads both)."""
        ...


DUAL_STREAM_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TEXT_STREAM_PROJECTIONS = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
ONE_TOKEN_MODULES = ("time_text_embed", ".norm1.", ".norm1_context.", "_mod.")  # read temb only
TEXT_MODULES = ("context_embedder", "txt_in", ".attn.add_", ".attn.to_add_out", ".ff_context.", ".txt_mlp.")


def dual_stream_lora_targets(num_blocks: int, exclude_last_text_stream: bool, unadapted_blocks: int = 0) -> tuple[list[str], list[str]]:
    """The authors' LoRA rule for dual-stream blocks (SD3, FLUX, Qwen-Image): every attention
    projection; when the last block's text output is not tapped, not that block's text stream (its
    output never reaches the head), nor any projection of the first ``unadapted_blocks`` blocks (FLUX)."""
    if not exclude_last_text_stream:
        return list(DUAL_STREAM_PROJECTIONS), []
    last = num_blocks - 1
    excluded = [f"transformer_blocks.{last}.attn.{name}" for name in TEXT_STREAM_PROJECTIONS]
    excluded += [f"transformer_blocks.{i}.attn.{name}" for i in range(min(unadapted_blocks, last)) for name in DUAL_STREAM_PROJECTIONS]
    return list(DUAL_STREAM_PROJECTIONS), excluded


def dual_stream_flops(backbone: nn.Module, image_tokens: int, text_tokens: int) -> int:
    """Linear and joint-attention FLOPs of a backbone of dual-stream blocks (``backbone.transformer_blocks``):
    the text stream's modules see the text tokens, modulation layers one token, the rest the image tokens."""

    def tokens_for(name: str) -> int:
        if any(part in name for part in ONE_TOKEN_MODULES):
            return 1
        return text_tokens if any(part in name for part in TEXT_MODULES) else image_tokens

    flops = linear_flops(backbone, tokens_for)
    for block in backbone.transformer_blocks:
        flops += attention_flops(image_tokens + text_tokens, image_tokens + text_tokens, backbone.hidden_size)
        if getattr(block, "attn2", None) is not None:  # SD3.5's second, image-only attention
            flops += attention_flops(image_tokens, image_tokens, backbone.hidden_size)
    return flops


def linear_flops(module: nn.Module, tokens_for: Callable[[str], int]) -> int:
    """FLOPs of every ``nn.Linear`` in ``module``, each applied to ``tokens_for(its name)`` tokens."""
    return sum(2 * m.in_features * m.out_features * tokens_for(name) for name, m in module.named_modules() if isinstance(m, nn.Linear))


def attention_flops(queries: int, keys: int, width: int) -> int:
    """QK^T and AV of ``queries`` tokens attending to ``keys`` tokens of total head width ``width``."""
    return 4 * queries * keys * width


def check_kept_layers(available: int, num_layers: int, visual_taps: list[int], text_taps: list[int], blocks: str = "blocks") -> None:
    """Refuse keeping more blocks than the transformer has, or taps beyond the kept ones."""
    if num_layers > available:
        raise ValueError(f"num_transformer_layers={num_layers} but the transformer has only {available} {blocks}")
    for kind, taps in (("visual", visual_taps), ("text", text_taps)):
        bad = [t for t in taps if not 0 <= t <= num_layers]
        if bad:
            raise ValueError(f"{kind} taps {bad} lie beyond the {num_layers} kept layers (valid: 0..{num_layers})")


def run_tapped(blocks, step: Callable, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
               visual_taps: list[int], text_taps: list[int]) -> BackboneOutput:
    """Run ``step(block, hidden, context) -> (context, hidden)`` through ``blocks`` and keep the
    streams after the tapped ones (tap 0: the embedded inputs)."""
    visual = [hidden] if 0 in visual_taps else []
    text = [context] if 0 in text_taps else []
    for depth, block in enumerate(blocks, start=1):
        context, hidden = step(block, hidden, context)
        if depth in visual_taps:
            visual.append(hidden)
        if depth in text_taps:
            text.append(context)
    return BackboneOutput(temb=temb, visual=visual, text=text)
