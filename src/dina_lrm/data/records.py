"""The one internal record every dataset reader produces: a prompt group with human ranks.

A pairwise dataset row (Pick-a-Pic, HPDv3, ``prompt,chosen,rejected``) is a group of two images;
a ranked dataset row (ImageReward, HPDv2) is a group of several. Lower rank is preferred, equal
ranks are ties. Readers never drop a row silently: every tie and every invalid row is counted in a
:class:`ReadReport` with its reason.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

ImageSource = Union[str, Path, bytes]  # a file path, or encoded image bytes (PNG/JPEG/WebP)


@dataclass
class PreferenceGroup:
    group_id: str
    prompt: str
    images: list[ImageSource]
    ranks: list[float]  # one per image; lower is preferred; equal ranks are ties
    confidence: float | None = None  # how sure the label is, in (0.5, 1]; None when the dataset gives none
    image_ids: list[str] = field(default_factory=list)  # stable names of the images (paths or uids)
    source: str = ""
    label: str = ""  # the dataset's own label of the group where a metric needs it (GenAI-Bench's vote_type)

    def __post_init__(self):
        if len(self.images) != len(self.ranks):
            raise ValueError(f"group {self.group_id}: {len(self.images)} images but {len(self.ranks)} ranks")
        if not self.image_ids:
            self.image_ids = [str(i) if not isinstance(i, bytes) else f"{self.group_id}/{n}" for n, i in enumerate(self.images)]

    def pairs(self) -> list[tuple[int, int]]:
        """(preferred, other) image indices of every pair with different ranks."""
        return [
            (a, b) if self.ranks[a] < self.ranks[b] else (b, a)
            for a, b in itertools.combinations(range(len(self.images)), 2)
            if self.ranks[a] != self.ranks[b]
        ]

    def tied_pairs(self) -> int:
        return sum(self.ranks[a] == self.ranks[b] for a, b in itertools.combinations(range(len(self.ranks)), 2))


@dataclass
class ReadReport:
    """What a reader saw: rows read, groups kept, pairs, ties, and invalid rows by reason."""

    rows: int = 0
    groups: int = 0
    pairs: int = 0
    tied_pairs: int = 0
    invalid: Counter = field(default_factory=Counter)

    def add(self, group: PreferenceGroup) -> None:
        self.groups += 1
        self.pairs += len(group.pairs())
        self.tied_pairs += group.tied_pairs()

    def reject(self, reason: str) -> None:
        self.invalid[reason] += 1

    def drop(self, group: PreferenceGroup, reason: str) -> None:
        """Undo ``add`` for a group found invalid later (an image that cannot be read)."""
        self.groups -= 1
        self.pairs -= len(group.pairs())
        self.tied_pairs -= group.tied_pairs()
        self.reject(reason)

    def merge(self, other: ReadReport) -> None:
        self.rows += other.rows
        self.groups += other.groups
        self.pairs += other.pairs
        self.tied_pairs += other.tied_pairs
        self.invalid.update(other.invalid)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "groups": self.groups,
            "pairs": self.pairs,
            "tied_pairs": self.tied_pairs,
            "invalid_rows": sum(self.invalid.values()),
            "invalid_by_reason": dict(sorted(self.invalid.items())),
        }

    @classmethod
    def from_dict(cls, raw: dict) -> ReadReport:
        return cls(raw["rows"], raw["groups"], raw["pairs"], raw["tied_pairs"], Counter(raw["invalid_by_reason"]))

    def summary(self) -> str:
        invalid = ", ".join(f"{n} {reason}" for reason, n in sorted(self.invalid.items())) or "none"
        return (
            f"{self.rows} rows -> {self.groups} groups, {self.pairs} pairs; "
            f"{self.tied_pairs} tied pairs left out; invalid rows: {invalid}"
        )
