"""Process-group set-up shared by ``prepare`` and ``train``."""

from __future__ import annotations

import torch


def cpu_only() -> bool:
    """True on a machine without an accelerator.

    There, ``accelerate launch --multi_gpu --num_processes N`` starts N processes that accelerate
    leaves unconnected unless told to run on CPU; with ``cpu=True`` they join one gloo group.
    """
    return torch.accelerator.current_accelerator() is None
