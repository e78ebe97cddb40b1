"""An exponential moving average of the trainable (LoRA) weights: the evaluated and saved weights, and
DiffusionNFT's "old" policy (an average whose decay follows a schedule of the step)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch


class EMA:
    """``ema <- decay * ema + (1 - decay) * weight``, applied after every ``every``-th optimizer step
    (Flow-GRPO and the authors' ReFL use decay 0.9 every 8 steps). ``decay`` may be a function of the
    step returning a value in [0, 1) (0: the average becomes the weights)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float | Callable[[int], float], every: int = 1):
        if not callable(decay) and not 0 < decay < 1:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"ema every must be >= 1, got {every}")
        self.parameters = list(parameters)
        self.decay, self.every = decay, every
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based); averages only on every ``every``-th."""
        if step % self.every:
            return
        decay = self.decay(step) if callable(self.decay) else self.decay
        if not 0 <= decay < 1:
            raise ValueError(f"an average's decay must lie in [0, 1), got {decay} at step {step}")
        for average, parameter in zip(self.shadow, self.parameters):
            average.lerp_(parameter.detach(), 1 - decay)

    @contextmanager
    def applied(self):
        """The averaged weights in place of the trained ones, restored afterwards."""
        trained = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for parameter, average in zip(self.parameters, self.shadow):
                parameter.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, weight in zip(self.parameters, trained):
                    parameter.copy_(weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): average.cpu() for i, average in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"the EMA state holds {len(state)} tensors, this model trains {len(self.shadow)}")
        for i, average in enumerate(self.shadow):
            average.copy_(state[str(i)])
