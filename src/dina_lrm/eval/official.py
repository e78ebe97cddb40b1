"""Each benchmark's own published metric, computed from one score per image as its authors' code does.

``ours`` (``protocol.py``) is one rule for every benchmark; these are the numbers the benchmarks'
papers and leaderboards report, so that a row of our table can stand beside theirs:

| format | metric | tie rule |
|---|---|---|
| ``hpdv2`` | HPSv2's mean per-prompt inversion score: 1 - discordant pairs / all n(n-1)/2 pairs | pairs tied in human rank (or in model rank) are never discordant, so they count as right |
| ``imagereward`` | ImageReward's accuracy over pairs of different human rank, pooled over prompts | an equal model score counts as wrong |
| ``pickapic`` | PickScore's accuracy over all pairs, human ties included | the model predicts a tie when its probabilities differ by at most ``threshold``; a tie on one side only scores 0.5 |
| ``genai_bench`` | GenAI-Bench's 4-way accuracy (A>B, B>A, A=B=Good, A=B=Bad) | a scalar reward predicts a tie within ``threshold``; a predicted tie is A=B=Good, so A=B=Bad votes are never matched |

Scores are in the flat order of the groups' images (as ``PairIndex``); ``pair_probability(a, b)``
gives the model's P(a preferred over b) for Pick-a-Pic and GenAI-Bench.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from dina_lrm.data.records import PreferenceGroup

GENAI_VOTES = ("leftvote", "rightvote", "tievote", "bothbad_vote")


def _per_group(groups: list[PreferenceGroup], scores) -> list[tuple[PreferenceGroup, np.ndarray]]:
    scores, out, offset = np.asarray(scores, dtype=np.float64), [], 0
    for group in groups:
        out.append((group, scores[offset : offset + len(group.images)]))
        offset += len(group.images)
    if offset != len(scores):
        raise ValueError(f"{len(scores)} scores for {offset} images")
    return out


def model_ranks(scores: np.ndarray) -> list[int]:
    """HPSv2's predicted ranking: each image's position in the scores sorted high to low (equal scores share one)."""
    ordered = sorted(scores.tolist(), reverse=True)
    return [ordered.index(score) for score in scores.tolist()]


def inversion_score(predicted: list, truth: list) -> float:
    n = len(predicted)
    discordant = sum((predicted[i] > predicted[j] and truth[i] < truth[j]) or (predicted[i] < predicted[j] and truth[i] > truth[j])
                     for i, j in itertools.combinations(range(n), 2))
    return 1 - discordant / (n * (n - 1) / 2)


def hpdv2_accuracy(groups: list[PreferenceGroup], scores) -> float:
    """HPSv2's evaluation: the inversion score of each prompt's predicted ranking, averaged over prompts."""
    return float(np.mean([inversion_score(model_ranks(s), group.ranks) for group, s in _per_group(groups, scores) if len(s) > 1]))


def imagereward_accuracy(groups: list[PreferenceGroup], scores) -> float:
    """ImageReward's test: over every pair of different human rank, right when the model's order is the same (strictly)."""
    right = total = 0
    for group, s in _per_group(groups, scores):
        for a, b in group.pairs():
            total += 1
            right += bool(s[a] > s[b])
    return right / total


def _pair_outcome(p_first: float, threshold: float) -> str:
    if abs(2 * p_first - 1) <= threshold:  # |P(first) - P(second)|, as PickScore compares its two probabilities
        return "tie"
    return "first" if p_first > 0.5 else "second"


def _human_outcome(group: PreferenceGroup) -> str:
    first, second = group.ranks
    return "tie" if first == second else "first" if first < second else "second"


def pickapic_accuracy(groups: list[PreferenceGroup], scores, pair_probability: Callable[[float, float], float],
                      threshold: float = 0.0) -> float:
    """PickScore's ``calc_acc``: 1 for the same outcome, 0.5 when one side is a tie, 0 otherwise; human ties included."""
    credits = []
    for group, s in _per_group(groups, scores):
        human, model = _human_outcome(group), _pair_outcome(pair_probability(s[0], s[1]), threshold)
        credits.append(1.0 if human == model else 0.5 if "tie" in (human, model) else 0.0)
    return float(np.mean(credits))


def genai_bench_accuracy(groups: list[PreferenceGroup], scores, pair_probability: Callable[[float, float], float],
                         threshold: float = 0.0) -> float:
    """GenAI-Bench's 4-way accuracy over all votes; the vote of each group is in ``group.label``."""
    predicted = {"first": "leftvote", "second": "rightvote", "tie": "tievote"}
    right = [predicted[_pair_outcome(pair_probability(s[0], s[1]), threshold)] == group.label for group, s in _per_group(groups, scores)]
    return float(np.mean(right))


OFFICIAL_METRICS = {
    "hpdv2": "HPSv2 inversion accuracy",
    "imagereward": "ImageReward accuracy (model ties wrong)",
    "pickapic": "PickScore tie-aware accuracy",
    "genai_bench": "GenAI-Bench 4-way accuracy",
}


def official_accuracy(fmt: str, groups: list[PreferenceGroup], scores, pair_probability, threshold: float = 0.0) -> float | None:
    """The benchmark's own metric for format ``fmt``, or None when it has none (``hpdv3``, ``generic``)."""
    if fmt == "hpdv2":
        return hpdv2_accuracy(groups, scores)
    if fmt == "imagereward":
        return imagereward_accuracy(groups, scores)
    if fmt == "pickapic":
        return pickapic_accuracy(groups, scores, pair_probability, threshold)
    if fmt == "genai_bench":
        return genai_bench_accuracy(groups, scores, pair_probability, threshold)
    return None
