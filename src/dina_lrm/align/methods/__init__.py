"""Alignment methods, one file each: ``refl``, ``grpo``, ``nft`` (DiffusionNFT), ``draft`` and ``sft``
(supervised fine-tuning on a latent set, the reference the others are measured against).

Each file holds its config dataclass (nested in ``AlignConfig`` under the method's name) and a class
with one ``step``; the shared loop (``align/trainer.py``) owns accelerate, the policy LoRA, the
rewards, evaluation, the hacking guard, checkpoints and outputs.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import torch

METHODS = {
    "grpo": "dina_lrm.align.methods.grpo:GRPO",
    "refl": "dina_lrm.align.methods.refl:ReFL",
    "nft": "dina_lrm.align.methods.nft:NFT",
    "draft": "dina_lrm.align.methods.draft:DRaFT",
    "sft": "dina_lrm.align.methods.sft:SFT",
}


class AlignMethod(ABC):
    """What the loop asks of a method. ``loop`` is the :class:`~dina_lrm.align.trainer.Aligner`."""

    name = ""

    def __init__(self, loop):
        self.loop = loop
        self.config = getattr(loop.config, self.name)

    @abstractmethod
    def step(self, prompts: list[str], generator: torch.Generator, timings: dict) -> dict:
        """One training step on ``prompts``: sample, score, update; returns the step's statistics."""

    def after_step(self, step: int) -> None:
        """Called after training step ``step`` (1-based) and the loop's EMA."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep to resume exactly (beyond the LoRA, optimizer and EMA)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""


def method_class(name: str) -> type[AlignMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown alignment method {name!r}; choose one of {tuple(METHODS)}")
    module, attribute = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attribute)
