"""dina-lrm: diffusion-native latent reward models."""

from dina_lrm.config import ConfigError, DiNaConfig, LoraSettings, ModelConfig, RewardHeadConfig, TrainingConfig, load_config
from dina_lrm.models.checkpoint import CheckpointError
from dina_lrm.models.reward_model import DiNaLRM
from dina_lrm.scorer import Scorer, ScoreResult, normalize_score

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DiNaConfig",
    "DiNaLRM",
    "LoraSettings",
    "ModelConfig",
    "RewardHeadConfig",
    "ScoreResult",
    "Scorer",
    "TrainingConfig",
    "load_config",
    "normalize_score",
]
