"""The hacking guard: validation prompts judged by an independent judge pick the checkpoint to keep.

A reward model is a learned proxy; optimised hard enough, its score keeps rising while images get
worse (grid artefacts, texture distortion, spurious objects). Every evaluation records the
validation reward and judge; the guard keeps the evaluation with the best judge, says when the two
part ways, and when the judge has stopped improving.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Evaluation:
    step: int
    reward: float
    judge: float


class JudgeGuard:
    """Tracks (step, validation reward, validation judge) and picks the best evaluation by the judge.

    ``patience``: evaluations without a better judge after which :attr:`should_stop` (0: never).
    ``tolerance``: how far below its best the judge must fall, with the reward above its value at the
    best, for :meth:`divergence_step` to call it hacking."""

    def __init__(self, patience: int = 0, tolerance: float = 0.01):
        self.patience, self.tolerance = patience, tolerance
        self.evaluations: list[Evaluation] = []

    @classmethod
    def from_history(cls, history: list[dict], patience: int = 0, tolerance: float = 0.01) -> JudgeGuard:
        """The guard as it stood after the logged evaluations (``eval_reward`` and ``eval_judge`` records)."""
        guard = cls(patience, tolerance)
        for record in history:
            if "eval_judge" in record:
                guard.observe(record["step"], record["eval_reward"], record["eval_judge"])
        return guard

    def observe(self, step: int, reward: float, judge: float) -> bool:
        """Record an evaluation; True when it is the best so far (ties keep the earlier one)."""
        improved = self.best is None or judge > self.best.judge
        self.evaluations.append(Evaluation(step, reward, judge))
        return improved

    @property
    def best(self) -> Evaluation | None:
        if not self.evaluations:
            return None
        return max(self.evaluations, key=lambda e: (e.judge, -e.step))

    @property
    def should_stop(self) -> bool:
        if not self.patience or self.best is None:
            return False
        later = [e for e in self.evaluations if e.step > self.best.step]
        return len(later) >= self.patience

    def divergence_step(self) -> int | None:
        """The first evaluation after the judge's best at which the reward is higher than at the best
        while the judge is more than ``tolerance`` below it; None if the two never part."""
        best = self.best
        if best is None:
            return None
        for evaluation in self.evaluations:
            if evaluation.step > best.step and evaluation.reward > best.reward and evaluation.judge < best.judge - self.tolerance:
                return evaluation.step
        return None
