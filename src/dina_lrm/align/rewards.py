"""DiNa-LRM as the reward of someone else's RL trainer (Flow-GRPO, DiffusionNFT and their forks).

Those trainers build each reward with ``factory(device)`` and call the returned
``fn(images, prompts, metadata) -> (scores, info)`` on a batch of samples. Two factories:

* :func:`flow_grpo_reward`: images NCHW in [0, 1] (the pipeline's ``output_type="pt"``), VAE-encoded
  with the generator's own VAE, scored by default at ``noise.IMAGE_U`` (0.1).
* :func:`flow_grpo_latent_reward`: the pipeline's final latents plus its prompt embeddings, so there
  is no decode/encode round trip and no text encoding, scored by default at ``noise.LATENT_U`` (0.4).

Each factory loads its own copy of the generator: the reward model's LoRA layers go into that copy,
never into the policy being trained.

Inside dina-lrm's own alignment loop a reward is an :class:`AlignReward`: clean latents and prompts
in, a (N,) tensor out. :class:`LatentReward` scores the latents directly with DiNa-LRM;
:class:`DecodedImageReward` decodes them with the generator's VAE and scores the pixels with any
Flow-GRPO style image reward, which is what a pixel-space reward model costs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dina_lrm.config import import_object
from dina_lrm.data.images import vae_decode
from dina_lrm.models.reward_model import DiNaLRM
from dina_lrm.config import IMAGE_U, LATENT_U
from dina_lrm.pipelines import DTYPES
from dina_lrm.scorer import ScoreResult, Scorer

SCALES = ("normalized", "raw")
INPUTS = ("images", "latents")


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
    u: float = LATENT_U,
    noise_levels: list[float] | None = None,
    n_draws: int = 1,
    seed: int | None = None,
    dtype: str = "float32",
    max_sequence_length: int | None = None,
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
            if torch.is_tensor(latents) and latents.dim() == 5:
                raise ValueError(f"latents of shape {tuple(latents.shape)} look like stacked trajectories (B, T+1, C, h, w): "
                                 "pass the final latents, latents[:, -1]")
            if len(latents) != len(prompts):
                raise ValueError(f"{len(latents)} latents for {len(prompts)} prompts")
            text = (
                {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
                if prompt_embeds is not None or pooled_prompt_embeds is not None
                else {"prompts": list(prompts)}
            )
            result = scorer.score(latents=latents, u=u, noise_levels=noise_levels, n_draws=n_draws, seed=seed, **text)
            return _output(result, scale)

        return fn

    return factory


def _load(reward_dir, model, device, dtype: str, max_sequence_length: int | None) -> Scorer:
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
    differentiable: bool  # can ReFL / DRaFT back-propagate through it?
    details: dict[str, np.ndarray]  # per-sample numbers of the last call (e.g. a judge's clauses), averaged in evaluations

    def __call__(self, latents: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
        """(N,) scores of clean normalised latents (N, C, h, w); higher is better."""
        ...


class LatentReward:
    """DiNa-LRM on the clean latents: no VAE decode; differentiable when called with grad enabled.
    ``scale``: ``normalized`` ``(raw + 10) / 10`` (what the authors' ReFL optimises) or ``raw``."""

    differentiable = True

    def __init__(self, scorer: Scorer, *, u: float = LATENT_U, noise_levels: list[float] | None = None, n_draws: int = 1,
                 scale: str = "normalized", name: str = "DiNa-LRM (latents)"):
        _check_scale(scale)
        self.scorer, self.u, self.noise_levels, self.n_draws, self.scale, self.name = scorer, u, noise_levels, n_draws, scale, name
        self.details: dict[str, np.ndarray] = {}
        scorer.model.requires_grad_(False)  # gradients flow through the reward to the latents, not into it

    def __call__(self, latents: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
        result = self.scorer.score(prompts, latents=latents, u=self.u, noise_levels=self.noise_levels, n_draws=self.n_draws, seed=seed,
                                   grad=torch.is_grad_enabled())
        return result.normalized if self.scale == "normalized" else result.raw


class DecodedImageReward:
    """Decode with the generator's VAE, then score the pixels with a Flow-GRPO style
    ``fn(images (N, 3, H, W) in [0, 1], prompts, metadata) -> (scores, info)``. ``differentiable``: the
    function returns torch scores with a graph back to the images (the decode keeps one under grad).
    Numeric per-sample lists in ``info`` are kept as :attr:`details`."""

    def __init__(self, vae: torch.nn.Module, fn: Callable, name: str, differentiable: bool = False):
        self.vae, self.fn, self.name, self.differentiable = vae, fn, name, differentiable
        self.details: dict[str, np.ndarray] = {}

    def __call__(self, latents: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
        prompts = list(prompts)
        scores, info = self.fn(vae_decode(self.vae, latents), prompts, [{} for _ in prompts])
        self.details = per_sample_details(info, len(prompts))
        return torch.as_tensor(scores, dtype=torch.float32, device=latents.device).reshape(-1)


class LatentFunctionReward:
    """A Flow-GRPO style function that reads the clean latents itself (a ``python`` reward with
    ``input: latents``): ``fn(latents (N, C, h, w), prompts, metadata) -> (scores, info)``, no decode."""

    def __init__(self, fn: Callable, name: str, differentiable: bool = False):
        self.fn, self.name, self.differentiable = fn, name, differentiable
        self.details: dict[str, np.ndarray] = {}

    def __call__(self, latents: torch.Tensor, prompts: list[str], seed: int) -> torch.Tensor:
        prompts = list(prompts)
        scores, info = self.fn(latents, prompts, [{} for _ in prompts])
        self.details = per_sample_details(info, len(prompts))
        return torch.as_tensor(scores, dtype=torch.float32, device=latents.device).reshape(-1)


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


@dataclass
class RewardSpec:
    """Which reward to align with (or to judge by).

    kind ``dina``: a DiNa-LRM directory (``path``) scoring the clean latents at ``u`` (or as the ensemble
    of ``noise_levels``) with ``n_draws`` noise draws, on the ``scale`` asked for. Its backbone is the policy's generator unless ``model``
    names another; on the policy's own generator it shares the policy's frozen weights (``share_backbone``).
    kind ``python``: ``target`` = ``module:attr`` or ``file.py:attr``, a Flow-GRPO style reward
    ``factory(device)`` (with ``kwargs``, ``target(**kwargs)`` returns the factory); with ``input: images``
    the loop decodes the latents with the generator's VAE first, with ``input: latents`` the function
    reads the latents (a function that declares ``inputs = "images"`` is refused). ``differentiable``:
    its scores are torch tensors with a graph back to its input, so ReFL and DRaFT can use it.
    """

    kind: str = "dina"
    path: str = ""
    model: str = ""
    share_backbone: bool = True
    u: float = LATENT_U
    noise_levels: list[float] | None = None
    n_draws: int = 1
    scale: str = "normalized"
    target: str = ""
    kwargs: dict = field(default_factory=dict)
    differentiable: bool = False
    name: str = ""
    input: str = "images"  # python rewards: images (decoded first) or latents (read as they are)
    weight: float = 1.0  # in the mix of rewards: grpo and nft weigh each reward's normalised advantages, refl and draft its score (0: logged only)

    def validate(self) -> None:
        kinds = ("dina", "python")
        if self.kind not in kinds:
            raise ValueError(f"unknown reward kind {self.kind!r}; choose one of {kinds} (a toy-world reward is a python target)")
        if self.kind == "dina" and not self.path:
            raise ValueError("a dina reward needs a path (a DiNa-LRM directory)")
        if self.kind == "python" and not self.target:
            raise ValueError("a python reward needs target: module:attr or file.py:attr (a factory(device))")
        _check_scale(self.scale)
        if self.weight < 0:
            raise ValueError(f"a reward's weight must be >= 0, got {self.weight}")
        if self.input not in INPUTS:
            raise ValueError(f"unknown reward input {self.input!r}; choose one of {INPUTS}")


def build_reward(spec: RewardSpec, *, generator: str, pipe, device, dtype: str = "float32") -> AlignReward:
    """The reward ``spec`` names. ``pipe``: the policy's pipeline, before its LoRA is added. A DiNa-LRM
    on the policy's own generator reuses ``pipe``'s weights and text encoders (one copy in memory);
    its LoRA goes into a weight-sharing copy of the module tree, never into the policy's modules. It
    encodes prompts with the T5 token count it was trained with, whatever the policy uses."""
    spec.validate()
    if spec.kind == "dina":
        if spec.share_backbone and spec.model in ("", generator):
            model = DiNaLRM.from_pretrained(spec.path, weight_sharing_copy(pipe.transformer))
            scorer = Scorer.from_model(model, pipe)
        else:
            scorer = _load(spec.path, spec.model or generator, device, dtype, None)
        return LatentReward(scorer, u=spec.u, noise_levels=spec.noise_levels, n_draws=spec.n_draws, scale=spec.scale,
                            name=spec.name or "DiNa-LRM (latents)")
    factory = import_object(spec.target, "reward target")
    if spec.kwargs:
        factory = factory(**spec.kwargs)
    fn, name = factory(device), spec.name or spec.target
    if spec.input == "latents":
        if getattr(fn, "inputs", None) == "images":
            raise ValueError(f"the reward {name} scores images only and cannot take latents: set its input to images")
        return LatentFunctionReward(fn, name, spec.differentiable)
    return DecodedImageReward(pipe.vae, fn, name, spec.differentiable)


def weight_sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module``'s tree whose parameters and buffers are the original tensors: adapters
    injected into the copy never touch the original modules, and the weights exist once."""
    memo = {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)
