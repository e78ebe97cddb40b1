"""The backbone interface: features and temb from latents, text embeddings and timesteps.

A backbone keeps the patch/text/time embeddings and the first N blocks of a generator's own
transformer and returns the token streams after the tapped blocks. Every backbone takes the SD3
call: unpacked VAE latents (B, C, h, w), the pipeline's text embeddings and timesteps on the
scheduler's 0-1000 scale, and applies its own conventions inside. Adding one means one new file
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
    temb: torch.Tensor  # (B, D): timestep + pooled-text embedding
    visual: list[torch.Tensor]  # per visual tap: (B, N_image_tokens, D)
    text: list[torch.Tensor]  # per text tap: (B, N_text_tokens, D)

    def chunk(self, parts: int) -> list[BackboneOutput]:
        """Split along the batch into ``parts`` equal outputs (undoes a concatenated batch)."""
        temb = self.temb.chunk(parts)
        visual = [t.chunk(parts) for t in self.visual]
        text = [t.chunk(parts) for t in self.text]
        return [
            BackboneOutput(temb[i], [v[i] for v in visual], [t[i] for t in text]) for i in range(parts)
        ]


class Backbone(Protocol):
    hidden_size: int
    latent_channels: int
    patch_size: int
    visual_taps: list[int]
    text_taps: list[int]

    def __call__(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> BackboneOutput: ...

    @classmethod
    def from_transformer(
        cls, transformer: nn.Module, num_layers: int, visual_taps: list[int], text_taps: list[int]
    ) -> Backbone: ...

    @staticmethod
    def latent_patch_size(config) -> int:
        """Latent sides must be multiples of this (from the transformer's config)."""
        ...

    def lora_target_modules(self, exclude_last_text_stream: bool) -> tuple[list[str], list[str]]: ...


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
