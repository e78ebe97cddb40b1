"""The evaluation protocol, the same for every reward model.

For each prompt group, every pair of images with different human ranks is compared; pairs tied in
human rank are left out. A pair counts 1 when the model scores the human-preferred image higher,
0.5 when the two scores are equal, and 0 otherwise. Accuracy is the mean over all pairs, with a
percentile bootstrap interval that resamples prompts (a prompt's pairs are not independent).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from dina_lrm.data.records import PreferenceGroup, ReadReport
from dina_lrm.eval.pairwise import bootstrap_interval, pair_wins

TIE_RULE = (
    "Every pair of images of a prompt with different human ranks is compared; pairs tied in human rank "
    "are left out. A pair scores 1 when the model ranks the human-preferred image higher, 0.5 when the "
    "two model scores are equal, 0 otherwise. Intervals: 95% percentile bootstrap over prompts."
)


@dataclass
class Census:
    """What the benchmark held, and what the protocol left out and why."""

    rows: int = 0
    prompts: int = 0  # groups with at least one comparable pair
    images: int = 0
    pairs: int = 0
    tied_pairs: int = 0
    all_tied_prompts: int = 0
    invalid_rows: dict = field(default_factory=dict)  # reason -> count (one-image groups among them)
    missing_images: int = 0
    groups_dropped_for_missing: int = 0
    images_outside_root: int = 0  # read only with --allow-outside-root
    split: str | None = None  # the split read, for parquet dataset folders
    files: list = field(default_factory=list)  # the dataset files read
    tied_groups_scored: int = 0  # all-tied pairs scored only for the benchmark's own metric (Pick-a-Pic, GenAI-Bench)

    @classmethod
    def of(cls, groups: list[PreferenceGroup], report: ReadReport) -> Census:
        comparable = [g for g in groups if g.pairs()]
        return cls(
            rows=report.rows,
            prompts=len(comparable),
            images=sum(len(g.images) for g in comparable),
            pairs=sum(len(g.pairs()) for g in comparable),
            tied_pairs=sum(g.tied_pairs() for g in groups),
            all_tied_prompts=len(groups) - len(comparable),
            invalid_rows=dict(sorted(Counter(report.invalid).items())),
        )


@dataclass
class PairIndex:
    """Every comparable pair of a benchmark, as positions into the flat list of its images."""

    group_ids: list[str]  # per pair
    preferred: np.ndarray  # (P,) flat image index of the human-preferred image
    other: np.ndarray  # (P,)

    @classmethod
    def of(cls, groups: list[PreferenceGroup]) -> PairIndex:
        group_ids, preferred, other, offset = [], [], [], 0
        for group in groups:
            for a, b in group.pairs():
                group_ids.append(group.group_id)
                preferred.append(offset + a)
                other.append(offset + b)
            offset += len(group.images)
        return cls(group_ids, np.asarray(preferred, dtype=np.int64), np.asarray(other, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.group_ids)

    def wins(self, image_scores) -> np.ndarray:
        """Per pair: 1, 0.5 or 0 (see ``TIE_RULE``) from one score per image (flat order)."""
        scores = torch.as_tensor(np.asarray(image_scores, dtype=np.float64))
        return pair_wins(scores[self.preferred], scores[self.other]).numpy().astype(np.float64)


def accuracy_summary(wins: np.ndarray, group_ids: list[str], resamples: int, seed: int) -> dict:
    low, high = bootstrap_interval(wins, group_ids, resamples=resamples, seed=seed)
    return {"accuracy": float(np.mean(wins)), "ci": [low, high], "pairs": len(wins), "prompts": len(set(group_ids))}


def calibration(p_preferred: np.ndarray, bins: int = 5) -> dict:
    """Reliability of the model's pair probabilities.

    ``p_preferred``: per pair, the model's probability that the human-preferred image wins. Each
    pair is oriented towards the model's favourite, so its confidence is ``max(p, 1 - p)`` and it is
    right when that favourite is the human choice (half right at p = 0.5). Bins over [0.5, 1].
    """
    p = np.asarray(p_preferred, dtype=np.float64)
    confidence = np.maximum(p, 1 - p)
    agreed = np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5))
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        if members.any():
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "pairs": int(members.sum()),
                         "confidence": float(confidence[members].mean()), "agreement": float(agreed[members].mean())})
    ece = sum(r["pairs"] * abs(r["agreement"] - r["confidence"]) for r in rows) / max(len(p), 1)
    return {"bins": rows, "ece": float(ece)}
