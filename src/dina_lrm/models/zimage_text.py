"""Z-Image text conditioning, as ``ZImagePipeline`` computes it: each prompt as one user turn of the
Qwen3 chat template (generation prompt added, thinking enabled), tokenized to ``max_sequence_length``
(128 in the authors' reward model), the text encoder's second-to-last hidden state, and only the
tokens the attention mask keeps.

Prompts differ in length, so the encoder returns the states zero-padded to ``max_sequence_length``
and the mask (B, tokens) in the place of the pooled embedding, which Z-Image does not have."""

from __future__ import annotations

import torch
from torch import nn

from dina_lrm.models.prompt_cache import CachedPromptEncoder


class ZImagePromptEncoder(CachedPromptEncoder):
    def __init__(self, tokenizer, text_encoder: nn.Module, max_sequence_length: int = 128, cache_size: int = 1024):
        super().__init__(cache_size)
        if tokenizer is None or text_encoder is None:
            raise ValueError("Z-Image text conditioning needs the pipeline's tokenizer and Qwen3 text encoder")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pipeline(cls, pipe, max_sequence_length: int = 128, cache_size: int = 1024) -> ZImagePromptEncoder:
        return cls(pipe.tokenizer, pipe.text_encoder, max_sequence_length, cache_size)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def chat(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached and differentiable: (states (B, max_sequence_length, width), mask (B, max_sequence_length))."""
        tokens = self.tokenizer([self.chat(p) for p in prompts], padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt").to(self.device)
        mask = tokens.attention_mask.bool()
        states = self.text_encoder(input_ids=tokens.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return states * mask[..., None], mask.to(states.dtype)
