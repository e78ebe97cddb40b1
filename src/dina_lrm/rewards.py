"""One reward protocol, and the adapters to the shapes other code calls.

A :class:`Reward` scores items with their prompts: ``reward(items, prompts, seed) -> (N,) tensor``,
higher is better. ``items`` are what its ``inputs`` says: ``"latents"`` (the generator's normalised
clean latents, one (N, C, h, w) tensor, or a list of (C, h, w) tensors of several shapes) or
``"images"`` (RGB PIL images, or an (N, 3, H, W) tensor in [0, 1]). ``seed`` makes a stochastic reward
reproducible. A ``differentiable`` reward keeps a graph from tensor items to its scores when called
with grad enabled (ReFL and DRaFT need one). Evaluation (``dina_lrm.eval``), alignment, search and
the hacking guard all call rewards this way.

* :class:`DiNaReward`: DiNa-LRM under one :class:`Setting` (noise levels and draws).
* :class:`FunctionReward`: any Flow-GRPO style ``fn(items, prompts, metadata) -> scores`` or
  ``-> (scores, info)`` (HPSv3, PickScore, ImageReward, a judge).
* :class:`DecodedReward`: an images reward behind the generator's VAE, so it takes latents.
* :func:`flow_grpo_reward` / :func:`flow_grpo_latent_reward`: DiNa-LRM in the shape Flow-GRPO,
  DiffusionNFT and their forks call, ``factory(device)`` -> ``fn(images, prompts, metadata) -> (scores, info)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from dina_lrm.config import IMAGE_U, LATENT_U
from dina_lrm.data.images import vae_decode
from dina_lrm.losses import pair_probability
from dina_lrm.pipelines import DTYPES
from dina_lrm.scorer import Scorer, ScoreResult

INPUTS = ("latents", "images")
SCALES = ("normalized", "raw")


@runtime_checkable
class Reward(Protocol):
    name: str
    inputs: str  # "latents" or "images"
    differentiable: bool

    def __call__(self, items, prompts: list[str], seed: int) -> torch.Tensor:
        """(N,) scores of ``items`` with their ``prompts``; higher is better."""
        ...


def check_reward(reward, where: str) -> Reward:
    """``reward`` if it follows the protocol, else a one-line error naming ``where`` it came from."""
    if not isinstance(reward, Reward) or reward.inputs not in INPUTS:
        raise ValueError(f"{where} is not a Reward (needs .name, .inputs in {INPUTS}, .differentiable and "
                         "__call__(items, prompts, seed)); wrap a plain function in dina_lrm.rewards.FunctionReward")
    return reward


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"unknown score scale {scale!r}; choose one of {SCALES}")


@dataclass(frozen=True)
class Setting:
    """How DiNa-LRM scores: noise levels (one, or several ensembled in the head) and noise draws."""

    levels: tuple[float, ...] = (LATENT_U,)
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


class DiNaReward:
    """DiNa-LRM under one :class:`Setting`. ``inputs="latents"`` scores latents directly (a list of
    several shapes is scored shape by shape, each batch with its own seed drawn from ``seed``);
    ``"images"`` VAE-encodes them first. ``scale``: ``raw`` or ``normalized``, ``(raw + 10) / 10``
    (what the authors' ReFL optimises). Gradients flow to the items, never into the reward model."""

    differentiable = True

    def __init__(self, scorer: Scorer, setting: Setting | None = None, *, inputs: str = "latents", scale: str = "raw",
                 name: str | None = None):
        check_scale(scale)
        if inputs not in INPUTS:
            raise ValueError(f"unknown reward input {inputs!r}; choose one of {INPUTS}")
        self.scorer, self.inputs, self.scale = scorer, inputs, scale
        self.setting = setting or Setting((LATENT_U if inputs == "latents" else IMAGE_U,))
        self.name = name or f"DiNa-LRM {self.setting.name}"
        self.details: dict[str, np.ndarray] = {}
        scorer.model.requires_grad_(False)

    def __call__(self, items, prompts: list[str], seed: int, **text) -> torch.Tensor:
        if isinstance(items, (list, tuple)) and self.inputs == "latents":
            return self._by_shape(list(items), list(prompts), seed)
        return self._pick(self.score(items, prompts, seed, **text))

    def score(self, items, prompts: list[str] | None, seed: int | None, **text) -> ScoreResult:
        """The scorer's whole result (raw and normalised scores, the noise levels used)."""
        return self.scorer.score(prompts, **{self.inputs: items}, noise_levels=list(self.setting.levels),
                                 n_draws=self.setting.draws, seed=seed, grad=torch.is_grad_enabled(), **text)

    def _pick(self, result: ScoreResult) -> torch.Tensor:
        return result.normalized if self.scale == "normalized" else result.raw

    def _by_shape(self, items: list[torch.Tensor], prompts: list[str], seed: int) -> torch.Tensor:
        by_shape: dict[tuple, list[int]] = {}
        for i, latent in enumerate(items):
            by_shape.setdefault(tuple(latent.shape), []).append(i)
        scores = [None] * len(items)
        for number, index in enumerate(by_shape.values()):
            batch = self.score(torch.stack([items[i] for i in index]), [prompts[i] for i in index], seed * 1009 + number)
            for i, value in zip(index, self._pick(batch)):
                scores[i] = value
        return torch.stack(scores)

    def preference_probability(self, preferred: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
        """The model's P(preferred beats other) on raw scores under its training loss's link; None for
        ensembles of several levels, where no single noise variance applies."""
        if len(self.setting.levels) != 1:
            return None
        sigma, _ = self.scorer.sigma_table.snap(torch.tensor(self.setting.levels[0]))
        loss = self.scorer.model.config.model.model_type
        return pair_probability(loss, preferred, other, sigma.expand_as(preferred))


class FunctionReward:
    """A Flow-GRPO style ``fn(items, prompts, metadata) -> scores`` or ``-> (scores, info)``; numeric
    per-sample lists in ``info`` are kept as :attr:`details`. ``differentiable``: ``fn`` returns torch
    scores with a graph back to tensor items."""

    def __init__(self, fn: Callable, name: str, *, inputs: str = "images", differentiable: bool = False):
        if inputs not in INPUTS:
            raise ValueError(f"unknown reward input {inputs!r}; choose one of {INPUTS}")
        if inputs == "latents" and getattr(fn, "inputs", None) == "images":
            raise ValueError(f"the reward {name} scores images only and cannot take latents: set its input to images")
        self.fn, self.name, self.inputs, self.differentiable = fn, name, inputs, differentiable
        self.details: dict[str, np.ndarray] = {}

    def __call__(self, items, prompts: list[str], seed: int) -> torch.Tensor:
        prompts = list(prompts)
        output = self.fn(items, prompts, [{} for _ in prompts])
        scores, info = output if isinstance(output, tuple) and len(output) == 2 else (output, {})
        self.details = per_sample_details(info, len(prompts))
        device = items.device if torch.is_tensor(items) else None
        if torch.is_tensor(scores):
            return scores.to(device=device, dtype=torch.float32).reshape(-1)
        return torch.as_tensor(np.asarray(scores, dtype=np.float32), device=device).reshape(-1)


class DecodedReward:
    """An images reward behind the generator's VAE: latents in, decoded to (N, 3, H, W) in [0, 1],
    scored. Differentiable when the images reward is (the decode keeps a graph under grad)."""

    inputs = "latents"

    def __init__(self, vae: torch.nn.Module, reward: Reward):
        if reward.inputs != "images":
            raise ValueError(f"{reward.name} takes {reward.inputs}, not images: it needs no decode")
        self.vae, self.reward, self.name, self.differentiable = vae, reward, reward.name, reward.differentiable

    @property
    def details(self) -> dict[str, np.ndarray]:
        return getattr(self.reward, "details", {})

    def __call__(self, items: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
        return self.reward(vae_decode(self.vae, items), prompts, seed).to(items.device)


def per_sample_details(info, count: int) -> dict[str, np.ndarray]:
    """The entries of a reward's ``info`` that hold one number per sample."""
    details = {}
    for key, value in (info or {}).items():
        try:
            array = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if array.shape == (count,):
            details[key] = array
    return details


def load_scorer(reward_dir, model, device, dtype: str = "float32", max_sequence_length: int | None = None) -> Scorer:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return Scorer.from_pretrained(reward_dir, model, device=device, dtype=DTYPES[dtype], max_sequence_length=max_sequence_length)


def flow_grpo_reward(
    reward_dir: str | Path,
    model: str | Path,
    *,
    u: float = IMAGE_U,
    noise_levels: list[float] | None = None,
    n_draws: int = 1,
    seed: int | None = None,
    dtype: str = "float32",
    max_sequence_length: int | None = None,
    scale: str = "normalized",
) -> Callable[[str | torch.device], Callable]:
    """``factory(device)`` -> ``fn(images, prompts, metadata) -> (scores, info)``.

    ``images``: a float tensor (N, 3, H, W) in [0, 1] (the pipeline's ``output_type="pt"``), or a list
    of PIL images / paths, VAE-encoded with the generator's own VAE. ``scores``: float32 numpy array
    (N,) on the ``scale`` asked for: ``(raw + 10) / 10`` or raw. ``info``: ``raw`` scores and the
    ``sigmas`` used. ``seed`` makes every call's noise the same. Each factory loads its own copy of the
    generator: the reward model's LoRA layers go into that copy, never into the policy being trained.
    """
    check_scale(scale)
    setting = Setting(tuple(noise_levels or [u]), n_draws)

    def factory(device: str | torch.device) -> Callable:
        reward = DiNaReward(load_scorer(reward_dir, model, device, dtype, max_sequence_length), setting, inputs="images")

        def fn(images, prompts, metadata=None) -> tuple[np.ndarray, dict]:
            if torch.is_tensor(images) and images.dim() == 4 and images.shape[1] != 3 and images.shape[-1] == 3:
                raise ValueError(f"images must be NCHW, got {tuple(images.shape)} (NHWC?): pass images.permute(0, 3, 1, 2)")
            with torch.no_grad():
                return _flow_grpo_output(reward.score(images, list(prompts), seed), scale)

        return fn

    return factory


def flow_grpo_latent_reward(
    reward_dir: str | Path,
    model: str | Path,
    *,
    u: float = LATENT_U,
    noise_levels: list[float] | None = None,
    n_draws: int = 1,
    seed: int | None = None,
    dtype: str = "float32",
    max_sequence_length: int | None = None,
    scale: str = "normalized",
) -> Callable[[str | torch.device], Callable]:
    """``factory(device)`` -> ``fn(latents, prompts, metadata, prompt_embeds=None, pooled_prompt_embeds=None)``.

    ``latents``: the pipeline's final (clean) normalised latents (N, C, h, w): no decode/encode round
    trip. With the pipeline's conditional ``prompt_embeds`` and ``pooled_prompt_embeds`` the prompts are
    not re-encoded; without them ``prompts`` are encoded (and cached) by the reward's own text encoders.
    """
    check_scale(scale)
    setting = Setting(tuple(noise_levels or [u]), n_draws)

    def factory(device: str | torch.device) -> Callable:
        reward = DiNaReward(load_scorer(reward_dir, model, device, dtype, max_sequence_length), setting)

        def fn(latents, prompts, metadata=None, prompt_embeds=None, pooled_prompt_embeds=None) -> tuple[np.ndarray, dict]:
            if torch.is_tensor(latents) and latents.dim() == 5:
                raise ValueError(f"latents of shape {tuple(latents.shape)} look like stacked trajectories (B, T+1, C, h, w): "
                                 "pass the final latents, latents[:, -1]")
            if len(latents) != len(prompts):
                raise ValueError(f"{len(latents)} latents for {len(prompts)} prompts")
            given = prompt_embeds is not None or pooled_prompt_embeds is not None
            text = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds} if given else {}
            with torch.no_grad():
                return _flow_grpo_output(reward.score(latents, None if given else list(prompts), seed, **text), scale)

        return fn

    return factory


def _flow_grpo_output(result: ScoreResult, scale: str) -> tuple[np.ndarray, dict]:
    scores = result.normalized if scale == "normalized" else result.raw
    info = {"raw": result.raw.float().cpu().numpy(), "sigmas": result.sigmas.tolist()}
    return scores.float().cpu().numpy(), info
