"""dina-lrm: diffusion-native latent reward models.

The public names load on first use, so that ``import dina_lrm`` (and ``dina-lrm --help``) does not
import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "dina_lrm.config",
    "DiNaConfig": "dina_lrm.config",
    "LoraSettings": "dina_lrm.config",
    "ModelConfig": "dina_lrm.config",
    "RewardHeadConfig": "dina_lrm.config",
    "TrainingConfig": "dina_lrm.config",
    "load_config": "dina_lrm.config",
    "CheckpointError": "dina_lrm.models.checkpoint",
    "DiNaLRM": "dina_lrm.models.reward_model",
    "Scorer": "dina_lrm.scorer",
    "ScoreResult": "dina_lrm.scorer",
    "normalize_score": "dina_lrm.scorer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dina_lrm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
