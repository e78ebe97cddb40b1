"""Pairwise preference accuracy: a pair is right when the preferred item scores higher; a tie in
model score counts half."""

from __future__ import annotations

import numpy as np
import torch

from dina_lrm.noise import SigmaTable, add_noise


def pair_wins(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when the preferred item scores higher, 0.5 on a tie, 0 otherwise."""
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.numel() == 0:
        raise ValueError(f"need two equal, non-empty score vectors, got {tuple(chosen_scores.shape)} and {tuple(rejected_scores.shape)}")
    if not (torch.isfinite(chosen_scores).all() and torch.isfinite(rejected_scores).all()):
        raise FloatingPointError("scores contain NaN or inf")
    return (chosen_scores > rejected_scores).float() + 0.5 * (chosen_scores == rejected_scores).float()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    return pair_wins(chosen_scores, rejected_scores).mean().item()


def bootstrap_interval(wins, groups: list, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the accuracy ``mean(wins)``, resampling whole groups (prompts) with
    replacement, since pairs of one prompt are not independent."""
    wins = np.asarray(wins, dtype=np.float64)
    if len(wins) != len(groups) or len(wins) == 0:
        raise ValueError(f"need one group per pair, got {len(wins)} wins and {len(groups)} groups")
    _, group_index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    group_wins = np.bincount(group_index, weights=wins)
    group_pairs = np.bincount(group_index).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(group_wins), size=(resamples, len(group_wins)))
    accuracies = group_wins[draws].sum(axis=1) / group_pairs[draws].sum(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(accuracies, [tail, 100 - tail])
    return float(low), float(high)


@torch.no_grad()
def score_noised(model, latents, states, pooled, sigma_table: SigmaTable, u: float, generator: torch.Generator) -> torch.Tensor:
    """Raw scores (B,) of clean latents noised to level ``u``, one independent draw per latent."""
    sigma, timestep = sigma_table.snap(torch.full((latents.shape[0],), float(u)))
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    noisy = add_noise(latents, sigma.to(latents.device), noise) if model.config.training.add_noise else latents
    return model(noisy, states, pooled, timestep.to(latents.device))[:, 0].float()


@torch.no_grad()
def pair_win_counts(model, batches, encode_prompts, sigma_table: SigmaTable, u_values: list[float], seed: int) -> torch.Tensor:
    """(len(u_values), 2): summed wins and pair counts per u over ``batches`` of pair dicts (as
    ``collate_pairs`` makes them). ``encode_prompts(batch) -> (states, pooled)`` on the model's device."""
    totals = torch.zeros(len(u_values), 2, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        states, pooled = encode_prompts(batch)
        chosen = batch["chosen"].to(model.device, model.dtype)
        rejected = batch["rejected"].to(model.device, model.dtype)
        for row, u in enumerate(u_values):
            wins = pair_wins(
                score_noised(model, chosen, states, pooled, sigma_table, u, generator),
                score_noised(model, rejected, states, pooled, sigma_table, u, generator),
            )
            totals[row] += torch.tensor([wins.sum().item(), wins.numel()], dtype=torch.float64)
    return totals
