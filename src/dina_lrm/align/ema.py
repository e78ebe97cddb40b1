"""The averages alignment keeps: an EMA of the trainable (LoRA) weights, evaluated and saved, and
DiffusionNFT's "old" policy (an average whose decay follows a schedule of the step). Both are
diffusers' ``EMAModel``, the one the reward trainer uses, with the decay Flow-GRPO and DiffusionNFT
use in place of its warm-up."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


class EMA(EMAModel):
    """``ema <- decay * ema + (1 - decay) * weight``, applied after every ``every``-th optimizer step
    (Flow-GRPO and the authors' ReFL use decay 0.9 every 8 steps). ``decay`` may be a function of the
    step returning a value in [0, 1) (0: the average becomes the weights)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float | Callable[[int], float], every: int = 1):
        if not callable(decay) and not 0 < decay < 1:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"ema every must be >= 1, got {every}")
        self.parameters = list(parameters)
        super().__init__(self.parameters, decay=0.0 if callable(decay) else decay)
        self.schedule = decay if callable(decay) else (lambda step: decay)
        self.every = every
        self.step_decay = 0.0

    def get_decay(self, optimization_step: int) -> float:
        return self.step_decay

    def update(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based); averages only on every ``every``-th."""
        if step % self.every:
            return
        self.step_decay = self.schedule(step)
        if not 0 <= self.step_decay < 1:
            raise ValueError(f"an average's decay must lie in [0, 1), got {self.step_decay} at step {step}")
        self.step(self.parameters)

    @contextmanager
    def applied(self):
        """The averaged weights in place of the trained ones, restored afterwards."""
        self.store(self.parameters)
        self.copy_to(self.parameters)
        try:
            yield
        finally:
            self.restore(self.parameters)

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("shadow_params", [])) != len(self.shadow_params):
            raise ValueError(f"the EMA state holds {len(state.get('shadow_params', []))} tensors, this model trains {len(self.shadow_params)}")
        super().load_state_dict(state)
        self.shadow_params = [average.to(p.device, p.dtype) for average, p in zip(self.shadow_params, self.parameters)]
