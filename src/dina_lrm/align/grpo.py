"""Group-relative advantages and the PPO-style clipped objective of Flow-GRPO."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float | None = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """Rewards (N,) of consecutive groups of ``group_size`` samples (one prompt each) -> advantages
    ``(r - mean_group) / (std_group + eps)``, clipped to [-clip, clip]."""
    if group_size < 2:
        raise ValueError(f"group-relative advantages need group_size >= 2, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N,) with N a multiple of group_size {group_size}, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("the reward returned NaN or inf; refusing to turn it into advantages")
    groups = rewards.float().view(-1, group_size)
    advantages = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + eps)
    advantages = advantages.flatten()
    return advantages.clamp(-clip, clip) if clip is not None else advantages


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(log_prob - old_log_prob)``;
    returns (loss, the fraction of samples where clipping was active)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, clip_fraction.detach()
