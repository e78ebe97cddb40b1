"""DiNa-LRM as the reward of someone else's RL trainer (Flow-GRPO, DiffusionNFT and their forks).

Those trainers build each reward with ``factory(device)`` and call the returned
``fn(images, prompts, metadata) -> (scores, info)`` on a batch of samples. Two factories:

* :func:`flow_grpo_reward`: images NCHW in [0, 1] (the pipeline's ``output_type="pt"``), VAE-encoded
  with the generator's own VAE; use ``u=0.1`` for decoded images.
* :func:`flow_grpo_latent_reward`: the pipeline's final latents plus its prompt embeddings, so there
  is no decode/encode round trip and no text encoding; ``u=0.4``.

Each factory loads its own copy of the generator: the reward model's LoRA layers go into that copy,
never into the policy being trained.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

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
