"""Pairwise preference losses.

The default is the noise-calibrated Thurstone model: each score is a Gaussian utility whose
variance grows with the diffusion noise, ``v(sigma) = 2 sigma^2 + 0.05``, so
``P(w > l) = Phi((s_w - s_l) / sqrt(2 v(sigma)))``, trained with the fidelity loss ``1 - sqrt(P)``.
Every loss takes an optional soft ``target`` (the probability that the first image is preferred,
1 by default) for rater confidence.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

THURSTONE_CONSTANT_VARIANCE = 0.5
BT_MARGIN = 1.0


def thurstone_variance(sigma: torch.Tensor) -> torch.Tensor:
    """Per-score utility variance at diffusion noise ``sigma``."""
    return 2.0 * sigma.float() ** 2 + 0.05


def thurstone_z(chosen: torch.Tensor, rejected: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    return (chosen.float() - rejected.float()) / torch.sqrt(2.0 * variance)


def thurstone_probability(chosen: torch.Tensor, rejected: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """P(chosen preferred over rejected) under the noise-calibrated Thurstone model."""
    return torch.special.ndtr(thurstone_z(chosen, rejected, thurstone_variance(sigma)))


def fidelity_loss(log_p: torch.Tensor, log_q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - sqrt(p y) - sqrt(q (1 - y))``, from log-probabilities so gradients stay finite at p -> 0."""
    return 1.0 - torch.exp(0.5 * (log_p + torch.log(target))) - torch.exp(0.5 * (log_q + torch.log1p(-target)))


def _nll(log_p: torch.Tensor, log_q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * log_p + (1.0 - target) * log_q)


def _thurstone(z: torch.Tensor, target: torch.Tensor, form: Callable) -> torch.Tensor:
    return form(torch.special.log_ndtr(z), torch.special.log_ndtr(-z), target)


def thurstone_loss(chosen, rejected, sigma, target):
    return _thurstone(thurstone_z(chosen, rejected, thurstone_variance(sigma)), target, fidelity_loss)


def thurstone_nll_loss(chosen, rejected, sigma, target):
    return _thurstone(thurstone_z(chosen, rejected, thurstone_variance(sigma)), target, _nll)


def thurstone_constant_loss(chosen, rejected, sigma, target):
    variance = torch.full_like(chosen.float(), THURSTONE_CONSTANT_VARIANCE)
    return _thurstone(thurstone_z(chosen, rejected, variance), target, fidelity_loss)


def bradley_terry_loss(chosen, rejected, sigma, target, margin: float = 0.0):
    d = chosen.float() - rejected.float()
    return _nll(F.logsigmoid(d - margin), F.logsigmoid(-(d - margin)), target)


def bradley_terry_margin_loss(chosen, rejected, sigma, target):
    return bradley_terry_loss(chosen, rejected, sigma, target, margin=BT_MARGIN)


LOSSES: dict[str, Callable] = {
    "thurstone": thurstone_loss,
    "thurstone_nll": thurstone_nll_loss,
    "thurstone_const": thurstone_constant_loss,
    "bt": bradley_terry_loss,
    "bt_margin": bradley_terry_margin_loss,
}


def preference_loss(
    name: str,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    sigma: torch.Tensor,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss over pairs. ``chosen``/``rejected``: scores (B,) or (B, 1); ``sigma``: (B,)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    chosen, rejected = chosen.reshape(-1), rejected.reshape(-1)
    sigma = torch.as_tensor(sigma, device=chosen.device).reshape(-1).expand_as(chosen)
    target = torch.ones_like(chosen, dtype=torch.float32) if target is None else target.reshape(-1).float()
    losses = LOSSES[name](chosen, rejected, sigma, target.clamp(0.0, 1.0))
    if not torch.isfinite(losses).all():
        raise FloatingPointError(f"{name} loss is not finite: scores contain NaN or inf")
    return losses.mean()


def pair_probability(name: str, chosen: torch.Tensor, rejected: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The model's probability that ``chosen`` beats ``rejected`` under the loss's own link."""
    d = chosen.float() - rejected.float()
    if name.startswith("bt"):
        return torch.sigmoid(d - (BT_MARGIN if name == "bt_margin" else 0.0))
    if name == "thurstone_const":
        return torch.special.ndtr(d / math.sqrt(2 * THURSTONE_CONSTANT_VARIANCE))
    return thurstone_probability(chosen, rejected, sigma)
