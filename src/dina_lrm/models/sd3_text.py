"""SD3 text conditioning: CLIP-L + CLIP-G penultimate states, zero-padded to the T5 width, with the
T5-XXL tokens after them; pooled = both CLIP pooled outputs concatenated."""

from __future__ import annotations

import torch
from torch import nn

from dina_lrm.models.prompt_cache import CachedPromptEncoder

CLIP_MAX_LENGTH = 77  # as diffusers' SD3 pipeline: the CLIP tokenizer's model_max_length, else 77


class SD3PromptEncoder(CachedPromptEncoder):
    """Encodes prompts with a generator's three text encoders, each distinct prompt once, with an LRU
    cache of ``cache_size`` prompts (on the encoders' device; see ``prompt_cache.py``)."""

    def __init__(
        self,
        tokenizers: list,
        text_encoders: list[nn.Module | None],
        max_sequence_length: int = 128,
        joint_attention_dim: int | None = None,
        cache_size: int = 1024,
    ):
        super().__init__(cache_size)
        if len(tokenizers) != 3 or len(text_encoders) != 3 or text_encoders[0] is None or text_encoders[1] is None:
            raise ValueError("SD3 text conditioning needs CLIP-L, CLIP-G and (optionally) T5 tokenizers and encoders")
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        for encoder in text_encoders:
            if encoder is not None:
                encoder.requires_grad_(False).eval()
        self.max_sequence_length = max_sequence_length
        t5 = text_encoders[2]
        self.t5_width = t5.config.d_model if t5 is not None else joint_attention_dim
        if self.t5_width is None:
            raise ValueError("without a T5 encoder, pass joint_attention_dim (the transformer's text width)")

    @classmethod
    def from_pipeline(cls, pipe, max_sequence_length: int = 128, cache_size: int = 1024) -> SD3PromptEncoder:
        return cls(
            [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
            [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
            max_sequence_length=max_sequence_length,
            joint_attention_dim=pipe.transformer.config.joint_attention_dim if pipe.transformer is not None else None,
            cache_size=cache_size,
        )

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    def _clip(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = self.tokenizers[index]
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=getattr(tokenizer, "model_max_length", CLIP_MAX_LENGTH),
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = self.text_encoders[index](ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _t5(self, prompts: list[str], dtype: torch.dtype) -> torch.Tensor:
        if self.text_encoders[2] is None:
            return torch.zeros(len(prompts), self.max_sequence_length, self.t5_width, device=self.device, dtype=dtype)
        ids = self.tokenizers[2](
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoders[2](ids.to(self.device))[0]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached and differentiable (for training the text encoders); ``__call__`` is the cached path."""
        (clip_l, pooled_l), (clip_g, pooled_g) = self._clip(0, prompts), self._clip(1, prompts)
        clip = torch.cat([clip_l, clip_g], dim=-1)
        t5 = self._t5(prompts, clip.dtype)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)
