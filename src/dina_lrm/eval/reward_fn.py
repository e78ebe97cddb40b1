"""The one interface the evaluation needs from a reward model, and DiNa-LRM's implementation.

A ``RewardFn`` scores prompts with images (RGB PIL images) or latents (the generator's normalised
VAE latents, one (C, H, W) tensor each). Higher is better; only the order of scores within a prompt
matters to the protocol. Wrap any other model (HPSv3, PickScore, ImageReward) with
:class:`ImageRewardFn`; see ``docs/eval.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from dina_lrm.losses import pair_probability
from dina_lrm.scorer import Scorer


@runtime_checkable
class RewardFn(Protocol):
    name: str
    inputs: str  # "images" or "latents"

    def __call__(self, prompts: list[str], items: list, seed: int) -> Sequence[float]:
        """One score per (prompt, item). ``seed`` makes stochastic models reproducible per batch."""
        ...


@dataclass
class ImageRewardFn:
    """Any ``fn(prompts, images) -> scores`` on RGB PIL images, e.g. HPSv3 or PickScore."""

    name: str
    fn: Callable[[list[str], list], Sequence[float]]
    inputs: str = "images"

    def __call__(self, prompts: list[str], items: list, seed: int) -> Sequence[float]:
        return self.fn(prompts, items)


@dataclass(frozen=True)
class Setting:
    """How DiNa-LRM scores: noise levels (one, or several ensembled in the head) and noise draws."""

    levels: tuple[float, ...]
    draws: int = 1

    def __post_init__(self):
        if not self.levels or self.draws < 1:
            raise ValueError(f"a setting needs at least one noise level and one draw, got {self}")
        if any(not 0.0 <= u <= 1.0 for u in self.levels):
            raise ValueError(f"noise levels must lie in [0, 1], got {list(self.levels)}")

    @property
    def name(self) -> str:
        levels = "+".join(f"{u:g}" for u in self.levels)
        base = f"u={levels}" if len(self.levels) == 1 else f"levels {levels}"
        return base if self.draws == 1 else f"{base} x{self.draws} draws"

    @property
    def forward_passes(self) -> int:
        """Backbone passes per scored image."""
        return len(self.levels) * self.draws


class DiNaRewardFn:
    """DiNa-LRM under one :class:`Setting`, on latents; latents of several shapes are scored by shape."""

    inputs = "latents"

    def __init__(self, scorer: Scorer, setting: Setting, name_prefix: str = "DiNa-LRM"):
        self.scorer = scorer
        self.setting = setting
        self.name = f"{name_prefix} {setting.name}"

    @torch.no_grad()
    def __call__(self, prompts: list[str], items: list, seed: int) -> list[float]:
        by_shape: dict[tuple, list[int]] = {}
        for i, latent in enumerate(items):
            by_shape.setdefault(tuple(latent.shape), []).append(i)
        scores = [0.0] * len(items)
        for number, index in enumerate(by_shape.values()):
            result = self.scorer.score(
                [prompts[i] for i in index],
                latents=torch.stack([items[i] for i in index]),
                noise_levels=list(self.setting.levels),
                n_draws=self.setting.draws,
                seed=seed * 1009 + number,
            )
            for i, value in zip(index, result.raw.tolist()):
                scores[i] = value
        return scores

    def preference_probability(self, preferred: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
        """The model's P(preferred beats other) under its training loss's link; None for ensembles
        of several levels, where no single noise variance applies."""
        if len(self.setting.levels) != 1:
            return None
        sigma, _ = self.scorer.sigma_table.snap(torch.tensor(self.setting.levels[0]))
        loss = self.scorer.model.config.model.model_type
        return pair_probability(loss, preferred, other, sigma.expand_as(preferred))
