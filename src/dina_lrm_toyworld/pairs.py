"""Fit any pairwise reward model on an in-memory ``PairTable`` for a fixed number of steps.

The model is reached only through ``step_fn(batch, generator) -> StepOutput``, so DiNa-LRM
(``preference_step``) and baselines (a pixel-space reward) train under the same loop, batches,
optimizer and budget. The budget is a step count, never a clock, so a busy machine trains the
same model; the seconds spent training (evaluation excluded) are measured and reported beside.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from dina_lrm import CachedPromptEncoder, PairTable, PreferenceBatch, StepOutput

StepFn = Callable[[PreferenceBatch, torch.Generator], StepOutput]


@dataclass
class FitConfig:
    batch_size: int = 32
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    max_steps: int = 1000
    eval_every: int = 0  # evaluate every this many steps (0: only at the start and the end)
    grad_clip: float = 1.0
    log_every: int = 10
    seed: int = 0


class PairBatches:
    """Shuffled batches of a ``PairTable``, with the prompts' text embeddings computed once."""

    def __init__(self, pairs: PairTable, prompt_encoder: CachedPromptEncoder, batch_size: int, seed: int):
        if len(pairs) == 0:
            raise ValueError("no preference pairs to train on")
        self.pairs = pairs
        self.states, self.pooled = prompt_encoder(pairs.prompts)
        self.batch_size = min(batch_size, len(pairs))
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        while True:
            order = torch.randperm(len(self.pairs), generator=self.generator)
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                index = order[start : start + self.batch_size]
                yield PreferenceBatch(
                    chosen=self.pairs.chosen[index],
                    rejected=self.pairs.rejected[index],
                    encoder_hidden_states=self.states[index],
                    pooled_projections=self.pooled[index],
                    target=self.pairs.confidence[index],
                )


def fit_pairs(
    step_fn: StepFn,
    parameters: Iterable[torch.nn.Parameter],
    batches: PairBatches,
    config: FitConfig,
    evaluate: Callable[[], dict] | None = None,
    desc: str = "train",
) -> list[dict]:
    """Train for ``max_steps``; returns the history: one row per log and evaluation point, and a last row
    with the final step and the training seconds."""
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)

    generator = torch.Generator().manual_seed(config.seed)
    history, window = [], []
    trained_s = 0.0
    bar = tqdm(total=config.max_steps, desc=desc, unit="step")
    for step, batch in enumerate(batches, start=1):
        if evaluate is not None and (step == 1 or (config.eval_every and (step - 1) % config.eval_every == 0)):
            history.append({"step": step - 1, "seconds": trained_s, **evaluate()})
        started = time.perf_counter()
        out = step_fn(batch, generator)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"{desc}: loss became {out.loss.item()} at step {step}")
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        trained_s += elapsed
        window.append((out.loss.item(), out.accuracy))
        if step % config.log_every == 0:
            loss, accuracy = (sum(v) / len(window) for v in zip(*window))
            history.append({"step": step, "seconds": trained_s, "loss": loss, "train_accuracy": accuracy})
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.2f}")
            window.clear()
        bar.update(1)
        if step >= config.max_steps:
            break
    bar.close()
    history.append({"step": step, "seconds": trained_s, **(evaluate() if evaluate is not None else {})})
    return history


def step_flops(step_fn: StepFn, model: torch.nn.Module, batch: PreferenceBatch) -> int:
    """FLOPs of one training step (forward and backward) on ``batch``, counted by torch; leaves no gradients."""
    with FlopCounterMode(display=False) as counter:
        step_fn(batch, torch.Generator().manual_seed(0)).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
