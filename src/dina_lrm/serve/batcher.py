"""Micro-batching: items from concurrent requests are merged into one backbone pass.

The worker takes the oldest waiting item, then collects more until ``max_batch_size`` items or until
that first item has waited ``max_wait_ms``. Items that cannot share a pass (different noise levels,
draws or tensor shapes) are scored in separate passes of the same round.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch


@dataclass
class WorkItem:
    latent: torch.Tensor  # (C, H, W)
    prompt_embeds: torch.Tensor  # (L, D)
    pooled_prompt_embeds: torch.Tensor  # (P,)
    levels: tuple[float, ...]
    n_draws: int
    seed: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> Hashable:
        """Items with equal keys can be stacked into one batch."""
        return (
            self.levels, self.n_draws, tuple(self.latent.shape), tuple(self.prompt_embeds.shape),
            tuple(self.pooled_prompt_embeds.shape), self.latent.dtype, self.prompt_embeds.dtype,
        )


class MicroBatcher:
    """``score_batch(items) -> list of results`` runs on one worker thread; ``submit`` is thread-safe."""

    def __init__(self, score_batch: Callable[[list[WorkItem]], list], max_batch_size: int, max_wait_ms: float):
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch_size >= 1 and max_wait_ms >= 0, got {max_batch_size}, {max_wait_ms}")
        self.score_batch = score_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.batch_sizes: Counter[int] = Counter()  # backbone passes by number of items
        self._queue: queue.Queue[WorkItem | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dina-lrm-batcher", daemon=True)
        self._thread.start()

    def submit(self, items: list[WorkItem]) -> list[Future]:
        for item in items:
            self._queue.put(item)
        return [item.future for item in items]

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            pending, stopping = [first], False
            deadline = first.enqueued + self.max_wait_s
            while len(pending) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                pending.append(item)
            for group in _compatible_groups(pending):
                self._score(group)
            if stopping:
                return

    def _score(self, group: list[WorkItem]) -> None:
        self.batch_sizes[len(group)] += 1
        try:
            results = self.score_batch(group)
        except Exception as err:  # the request fails, the worker keeps serving others
            for item in group:
                item.future.set_exception(err)
            return
        for item, result in zip(group, results):
            item.future.set_result(result)


def _compatible_groups(items: list[WorkItem]) -> list[list[WorkItem]]:
    groups: dict[Hashable, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.key, []).append(item)
    return list(groups.values())
