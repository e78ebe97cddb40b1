"""Qwen-Image text conditioning: the stock ``QwenImagePipeline.encode_prompt`` (the Qwen2.5-VL
encoder's last hidden state in the pipeline's prompt template, template tokens dropped), run by a
text-only pipeline around the generator's tokenizer and encoder, as the authors' reward model does.

Prompts differ in length, so the encoder returns the states zero-padded to ``max_sequence_length``
(512 in the authors' code) and the mask (B, tokens) in the place of the pooled embedding."""

from __future__ import annotations

import torch
from diffusers import QwenImagePipeline
from torch import nn

from dina_lrm.models.prompt_cache import CachedPromptEncoder


class QwenImagePromptEncoder(CachedPromptEncoder):
    def __init__(self, tokenizer, text_encoder: nn.Module, max_sequence_length: int = 512, cache_size: int = 1024):
        super().__init__(cache_size)
        if tokenizer is None or text_encoder is None:
            raise ValueError("Qwen-Image text conditioning needs the pipeline's tokenizer and Qwen2.5-VL text encoder")
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.pipeline = QwenImagePipeline(scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=tokenizer, transformer=None)
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pipeline(cls, pipe, max_sequence_length: int = 512, cache_size: int = 1024) -> QwenImagePromptEncoder:
        return cls(pipe.tokenizer, pipe.text_encoder, max_sequence_length, cache_size)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached and differentiable: (states (B, max_sequence_length, width), mask (B, max_sequence_length))."""
        states, mask = self.pipeline.encode_prompt(list(prompts), device=self.device, max_sequence_length=self.max_sequence_length)
        mask = torch.ones(states.shape[:2], device=states.device) if mask is None else mask.to(states.dtype)
        padding = self.max_sequence_length - states.shape[1]
        return nn.functional.pad(states, (0, 0, 0, padding)), nn.functional.pad(mask, (0, padding))
