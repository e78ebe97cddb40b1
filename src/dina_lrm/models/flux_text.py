"""FLUX text conditioning, as ``FluxPipeline.encode_prompt`` computes it: the pooled output of
CLIP-L at 77 tokens (pooled_projections) and the last hidden state of T5-XXL at
``max_sequence_length`` tokens, no attention mask (encoder_hidden_states; 128 in the authors' reward
model). The text position ids FLUX needs are all zero and built by the backbone."""

from __future__ import annotations

import torch
from torch import nn

from dina_lrm.models.prompt_cache import CachedPromptEncoder

CLIP_MAX_LENGTH = 77


class FluxPromptEncoder(CachedPromptEncoder):
    def __init__(self, tokenizers: list, text_encoders: list[nn.Module], max_sequence_length: int = 128, cache_size: int = 1024):
        super().__init__(cache_size)
        if len(tokenizers) != 2 or len(text_encoders) != 2 or any(e is None for e in text_encoders):
            raise ValueError("FLUX text conditioning needs the CLIP-L and T5 tokenizers and encoders")
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        for encoder in text_encoders:
            encoder.requires_grad_(False).eval()
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pipeline(cls, pipe, max_sequence_length: int = 128, cache_size: int = 1024) -> FluxPromptEncoder:
        return cls([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], max_sequence_length, cache_size)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    def _ids(self, index: int, prompts: list[str], length: int) -> torch.Tensor:
        return self.tokenizers[index](prompts, padding="max_length", max_length=length, truncation=True,
                                      return_tensors="pt").input_ids.to(self.device)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached and differentiable; ``__call__`` is the cached path."""
        clip_length = getattr(self.tokenizers[0], "model_max_length", CLIP_MAX_LENGTH)
        pooled = self.text_encoders[0](self._ids(0, prompts, clip_length), output_hidden_states=False).pooler_output
        states = self.text_encoders[1](self._ids(1, prompts, self.max_sequence_length), output_hidden_states=False)[0]
        return states, pooled.to(states.dtype)
