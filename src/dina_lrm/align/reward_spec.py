"""Which rewards an alignment run uses (:class:`RewardSpec`, as its YAML names them) and how they are
built (:func:`build_reward`): a DiNa-LRM on the policy's own generator shares the policy's frozen
weights; a Flow-GRPO style function is decoded-then-scored or reads the latents. Every reward built
here follows :class:`dina_lrm.rewards.Reward`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from dina_lrm.config import LATENT_U, import_object
from dina_lrm.models.reward_model import DiNaLRM
from dina_lrm.rewards import INPUTS, DecodedReward, DiNaReward, FunctionReward, Reward, Setting, check_scale, load_scorer
from dina_lrm.scorer import Scorer


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
        check_scale(self.scale)
        if self.weight < 0:
            raise ValueError(f"a reward's weight must be >= 0, got {self.weight}")
        if self.input not in INPUTS:
            raise ValueError(f"unknown reward input {self.input!r}; choose one of {INPUTS}")


def build_reward(spec: RewardSpec, *, generator: str, pipe, device, dtype: str = "float32") -> Reward:
    """The reward ``spec`` names. ``pipe``: the policy's pipeline, before its LoRA is added. A DiNa-LRM
    on the policy's own generator reuses ``pipe``'s weights and text encoders (one copy in memory);
    its LoRA goes into a weight-sharing copy of the module tree, never into the policy's modules. It
    encodes prompts with the T5 token count it was trained with, whatever the policy uses."""
    spec.validate()
    if spec.kind == "dina":
        if spec.share_backbone and spec.model in ("", generator):
            scorer = Scorer.from_model(DiNaLRM.from_pretrained(spec.path, weight_sharing_copy(pipe.transformer)), pipe)
        else:
            scorer = load_scorer(spec.path, spec.model or generator, device, dtype)
        setting = Setting(tuple(spec.noise_levels or [spec.u]), spec.n_draws)
        return DiNaReward(scorer, setting, scale=spec.scale, name=spec.name or "DiNa-LRM (latents)")
    factory = import_object(spec.target, "reward target")
    if spec.kwargs:
        factory = factory(**spec.kwargs)
    reward = FunctionReward(factory(device), spec.name or spec.target, inputs=spec.input, differentiable=spec.differentiable)
    return reward if spec.input == "latents" else DecodedReward(pipe.vae, reward)


def weight_sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module``'s tree whose parameters and buffers are the original tensors: adapters
    injected into the copy never touch the original modules, and the weights exist once."""
    memo = {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)
