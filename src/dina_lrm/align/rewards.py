"""DiNa-LRM as the reward of someone else's RL trainer (Flow-GRPO, DiffusionNFT and their forks).

Those trainers build each reward with ``factory(device)`` and call the returned
``fn(images, prompts, metadata) -> (scores, info)`` on a batch of samples. Two factories:

* :func:`flow_grpo_reward`: images NCHW in [0, 1] (the pipeline's ``output_type="pt"``), VAE-encoded
  with the generator's own VAE; use ``u=0.1`` for decoded images.
* :func:`flow_grpo_latent_reward`: the pipeline's final latents plus its prompt embeddings, so there
  is no decode/encode round trip and no text encoding; ``u=0.4``.

Each factory loads its own copy of the generator: the reward model's LoRA layers go into that copy,
never into the policy being trained.

Inside dina-lrm's own alignment loop a reward is an :class:`AlignReward`: clean latents and prompts
in, a (N,) tensor out. :class:`LatentReward` scores the latents directly with DiNa-LRM;
:class:`DecodedImageReward` decodes them with the generator's VAE and scores the pixels with any
image reward, which is what a pixel-space reward model costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dina_lrm.config import import_object
from dina_lrm.data.images import vae_decode
from dina_lrm.scorer import DTYPES, ScoreResult, Scorer

SCALES = ("normalized", "raw")


def flow_grpo_reward(
    reward_dir: str | Path,
    model: str | Path,
    *,
    u: float = 0.1,
    noise_levels: list[float] | None = None,
    n_draws: int = 1,
    seed: int | None = None,
    dtype: str = "float32",
    max_sequence_length: int = 128,
    scale: str = "normalized",
) -> Callable[[str | torch.device], Callable]:
    """``factory(device)`` -> ``fn(images, prompts, metadata) -> (scores, info)``.

    ``images``: a float tensor (N, 3, H, W) in [0, 1], or a list of PIL images / paths.
    ``scores``: float32 numpy array (N,) on the ``scale`` asked for: ``(raw + 10) / 10`` or raw.
    ``info``: ``raw`` scores and the ``sigmas`` used. ``seed`` makes every call's noise the same.
    """
    _check_scale(scale)

    def factory(device: str | torch.device) -> Callable:
        scorer = _load(reward_dir, model, device, dtype, max_sequence_length)

        def fn(images, prompts, metadata=None) -> tuple[np.ndarray, dict]:
            if torch.is_tensor(images) and images.dim() == 4 and images.shape[1] != 3 and images.shape[-1] == 3:
                raise ValueError(f"images must be NCHW, got {tuple(images.shape)} (NHWC?): pass images.permute(0, 3, 1, 2)")
            result = scorer.score(list(prompts), images=images, u=u, noise_levels=noise_levels, n_draws=n_draws, seed=seed)
            return _output(result, scale)

        return fn

    return factory


def flow_grpo_latent_reward(
    reward_dir: str | Path,
    model: str | Path,
    *,
    u: float = 0.4,
    noise_levels: list[float] | None = None,
    n_draws: int = 1,
    seed: int | None = None,
    dtype: str = "float32",
    max_sequence_length: int = 128,
    scale: str = "normalized",
) -> Callable[[str | torch.device], Callable]:
    """``factory(device)`` -> ``fn(latents, prompts, metadata, prompt_embeds=None, pooled_prompt_embeds=None)``.

    ``latents``: the pipeline's final (clean) normalised latents (N, C, h, w). With the pipeline's
    conditional ``prompt_embeds`` and ``pooled_prompt_embeds`` the prompts are not re-encoded;
    without them ``prompts`` are encoded (and cached) by the reward's own text encoders.
    """
    _check_scale(scale)

    def factory(device: str | torch.device) -> Callable:
        scorer = _load(reward_dir, model, device, dtype, max_sequence_length)

        def fn(latents, prompts, metadata=None, prompt_embeds=None, pooled_prompt_embeds=None) -> tuple[np.ndarray, dict]:
            text = (
                {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
                if prompt_embeds is not None or pooled_prompt_embeds is not None
                else {"prompts": list(prompts)}
            )
            result = scorer.score(latents=latents, u=u, noise_levels=noise_levels, n_draws=n_draws, seed=seed, **text)
            return _output(result, scale)

        return fn

    return factory


def _load(reward_dir, model, device, dtype: str, max_sequence_length: int) -> Scorer:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return Scorer.from_pretrained(reward_dir, model, device=device, dtype=DTYPES[dtype], max_sequence_length=max_sequence_length)


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"unknown score scale {scale!r}; choose one of {SCALES}")


def _output(result: ScoreResult, scale: str) -> tuple[np.ndarray, dict]:
    scores = result.normalized if scale == "normalized" else result.raw
    info = {"raw": result.raw.float().cpu().numpy(), "sigmas": result.sigmas.tolist()}
    return scores.float().cpu().numpy(), info


class AlignReward(Protocol):
    name: str
    differentiable: bool  # can DRaFT back-propagate through it?

    def __call__(self, latents: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
        """(N,) scores of clean normalised latents (N, C, h, w); higher is better."""
        ...


class LatentReward:
    """DiNa-LRM on the clean latents: no VAE decode; differentiable when called with grad enabled."""

    differentiable = True

    def __init__(self, scorer: Scorer, *, u: float = 0.4, n_draws: int = 1, name: str = "DiNa-LRM (latents)"):
        self.scorer, self.u, self.n_draws, self.name = scorer, u, n_draws, name
        scorer.model.requires_grad_(False)  # gradients flow through the reward to the latents, not into it

    def __call__(self, latents: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
        result = self.scorer.score(prompts, latents=latents, u=self.u, n_draws=self.n_draws, seed=seed, grad=torch.is_grad_enabled())
        return result.raw


@dataclass
class DecodedImageReward:
    """Decode with the generator's VAE, then ``fn(images (N, 3, H, W) in [0, 1], prompts) -> (N,) scores``."""

    vae: torch.nn.Module
    fn: Callable[[torch.Tensor, list[str]], torch.Tensor]
    name: str
    differentiable: bool = False

    def __call__(self, latents: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
        scores = self.fn(vae_decode(self.vae, latents), list(prompts))
        return torch.as_tensor(scores, dtype=torch.float32, device=latents.device).reshape(-1)


def flow_grpo_image_reward(factory: Callable, vae, device, name: str) -> DecodedImageReward:
    """A Flow-GRPO style ``factory(device)`` (``fn(images, prompts, metadata) -> (scores, info)``) as an
    :class:`DecodedImageReward`."""
    fn = factory(device)
    return DecodedImageReward(vae, lambda images, prompts: fn(images, prompts, [{} for _ in prompts])[0], name)


@dataclass
class RewardSpec:
    """Which reward to align with (or to judge by).

    kind ``dina``: a DiNa-LRM directory (``path``) scoring latents at ``u`` with ``n_draws``;
    ``python``: ``target`` = ``module:attr`` or ``file.py:attr``, a Flow-GRPO style image reward factory;
    ``toy_judge``: the toy world's judge on decoded images; ``toy_pixel``: the toy world's pixel reward
    model saved at ``path`` (decodes, then scores).
    """

    kind: str = "dina"
    path: str = ""
    target: str = ""
    u: float = 0.4
    n_draws: int = 1

    def validate(self) -> None:
        kinds = ("dina", "python", "toy_judge", "toy_pixel")
        if self.kind not in kinds:
            raise ValueError(f"unknown reward kind {self.kind!r}; choose one of {kinds}")
        if self.kind in ("dina", "toy_pixel") and not self.path:
            raise ValueError(f"a {self.kind} reward needs a path")
        if self.kind == "python" and not self.target:
            raise ValueError("a python reward needs target: module:attr or file.py:attr (a factory(device))")


def build_reward(spec: RewardSpec, *, generator: str, pipe, device, max_sequence_length: int, dtype: str = "float32") -> AlignReward:
    """The reward ``spec`` names. ``pipe``: the policy's pipeline, whose VAE decodes for image rewards
    (a DiNa-LRM loads its own copy of ``generator``, so its LoRA never touches the policy)."""
    spec.validate()
    vae = pipe.vae
    if spec.kind == "dina":
        scorer = _load(spec.path, generator, device, dtype, max_sequence_length)
        return LatentReward(scorer, u=spec.u, n_draws=spec.n_draws)
    if spec.kind == "python":
        return flow_grpo_image_reward(import_object(spec.target, "reward target"), vae, device, spec.target)
    from dina_lrm.toyworld import alignment

    if spec.kind == "toy_judge":
        return DecodedImageReward(vae, alignment.judge_scores, "toy judge")
    return alignment.pixel_reward(spec.path, pipe, device)
