"""Group-relative advantages, shared by Flow-GRPO and DiffusionNFT: each reward normalised within each
prompt's group of samples (by the group's std, or the batch's), several rewards mixed with weights."""

from __future__ import annotations

import torch


def normalised_rewards(rewards: torch.Tensor, group_size: int, global_std: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """Rewards (N,) of consecutive groups of ``group_size`` samples (one prompt each) -> ``(r - mean_group) / (std + eps)``.

    ``std`` is the group's own (population) std, or with ``global_std`` the std of the whole batch, as
    Flow-GRPO's ``global_std`` option: then a group of near-equal rewards gets near-zero advantages
    instead of +-1 of pure noise."""
    if group_size < 2:
        raise ValueError(f"group-relative advantages need group_size >= 2, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size {group_size}, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("the reward returned NaN or inf; refusing to turn it into advantages")
    groups = rewards.double().view(-1, group_size)
    std = rewards.double().std(unbiased=False) if global_std else groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).flatten().float()


def group_advantages(rewards: torch.Tensor | list[torch.Tensor], group_size: int, weights: list[float] | None = None,
                     clip: float | None = 5.0, global_std: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """Advantages ``sum_k w_k normalised(r_k)`` of one reward (N,) or several (each normalised on its own,
    as Flow-GRPO-Fast mixes DiNa-LRM with 0.2 x a proxy reward), clipped to [-clip, clip]."""
    rewards = [rewards] if torch.is_tensor(rewards) else list(rewards)
    weights = [1.0] * len(rewards) if weights is None else list(weights)
    if len(weights) != len(rewards):
        raise ValueError(f"{len(weights)} advantage weights for {len(rewards)} rewards: give one weight per reward")
    advantages = sum(w * normalised_rewards(r, group_size, global_std, eps) for w, r in zip(weights, rewards))
    return advantages.clamp(-clip, clip) if clip is not None else advantages


def informative_samples(advantages: torch.Tensor, batches: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of the samples to train on, as flow_grpo selects them: those with a non-zero advantage
    (a group whose rewards are all equal teaches nothing); when their count is not a multiple of
    ``batches`` (or is zero), randomly chosen zero-advantage samples are added back until it is."""
    keep = advantages != 0
    kept = int(keep.sum())
    if kept % batches or kept == 0:
        dropped = torch.nonzero(~keep).flatten()
        missing = batches - kept % batches
        if len(dropped) >= missing:
            keep[dropped[torch.randperm(len(dropped), generator=generator)[:missing]]] = True
    return torch.nonzero(keep).flatten()
