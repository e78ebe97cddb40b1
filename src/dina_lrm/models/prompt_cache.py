"""Prompt encoding with a thread-safe LRU cache, shared by every backbone's text conditioning.

A subclass says how a batch of prompts becomes ``(encoder_hidden_states, pooled_projections)``
(:meth:`CachedPromptEncoder.encode`, uncached and differentiable); calling the encoder encodes
each distinct prompt once and keeps recent ones. Safe to call from several threads at once (an RL
trainer's reward thread pool): the cache is guarded by a lock, and each call keeps its own
embeddings, whatever other calls evict meanwhile.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict

import torch


class CachedPromptEncoder(ABC):
    max_sequence_length: int

    def __init__(self, cache_size: int = 1024):
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    @abstractmethod
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached and differentiable: (encoder_hidden_states, pooled_projections) of ``prompts``."""

    def __call__(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states (B, tokens, width), pooled_projections (B, pooled width))."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        distinct = list(dict.fromkeys(prompts))
        with self._lock:
            found = {p: self._cache[p] for p in distinct if p in self._cache}
            for prompt in found:
                self._cache.move_to_end(prompt)
        new = [p for p in distinct if p not in found]
        if new:
            with torch.no_grad():
                states, pooled = self.encode(new)
            encoded = {prompt: (states[i], pooled[i]) for i, prompt in enumerate(new)}
            found.update(encoded)
            with self._lock:
                self._cache.update(encoded)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        entries = [found[p] for p in prompts]
        return torch.stack([e[0] for e in entries]), torch.stack([e[1] for e in entries])


def padded_with_mask(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, longest, width) zero-padded states and their (B, longest) mask from per-prompt (tokens, width) tensors."""
    if not embeds or any(e.dim() != 2 for e in embeds):
        raise ValueError("per-prompt embeddings must be a non-empty list of (tokens, width) tensors")
    states = torch.nn.utils.rnn.pad_sequence(list(embeds), batch_first=True)
    mask = torch.zeros(states.shape[:2], dtype=states.dtype, device=states.device)
    for i, e in enumerate(embeds):
        mask[i, : len(e)] = 1
    return states, mask
