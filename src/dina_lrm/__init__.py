"""dina-lrm: diffusion-native latent reward models.

The public names load on first use, so that ``import dina_lrm`` (and ``dina-lrm --help``) does not
import torch. (Training, alignment and serving run as ``Trainer(config).train()``,
``Aligner(config).run()`` and ``dina_lrm.serve.server.serve(ServeConfig(...))``: the names ``train``,
``align`` and ``serve`` are this package's subpackages.)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # configuration
    "ConfigError": "dina_lrm.config",
    "DiNaConfig": "dina_lrm.config",
    "LoraSettings": "dina_lrm.config",
    "ModelConfig": "dina_lrm.config",
    "RewardHeadConfig": "dina_lrm.config",
    "TrainingConfig": "dina_lrm.config",
    "load_config": "dina_lrm.config",
    "IMAGE_U": "dina_lrm.config",
    "LATENT_U": "dina_lrm.config",
    # the model and scoring
    "CheckpointError": "dina_lrm.models.checkpoint",
    "DiNaLRM": "dina_lrm.models.reward_model",
    "Scorer": "dina_lrm.scorer",
    "ScoreResult": "dina_lrm.scorer",
    "NonFiniteScoreError": "dina_lrm.scorer",
    "normalize_score": "dina_lrm.scorer",
    "load_pipeline": "dina_lrm.pipelines",
    # data and training
    "PrepareConfig": "dina_lrm.data.config",
    "prepare": "dina_lrm.data.prepare",
    "Trainer": "dina_lrm.train.trainer",
    # evaluation
    "EvalConfig": "dina_lrm.eval.config",
    "evaluate": "dina_lrm.eval.runner",
    # serving
    "ServeConfig": "dina_lrm.serve.config",
    "RewardClient": "dina_lrm.serve.client",
    # the reward protocol and its adapters
    "Reward": "dina_lrm.rewards",
    "Setting": "dina_lrm.rewards",
    "DiNaReward": "dina_lrm.rewards",
    "FunctionReward": "dina_lrm.rewards",
    "DecodedReward": "dina_lrm.rewards",
    "flow_grpo_reward": "dina_lrm.rewards",
    "flow_grpo_latent_reward": "dina_lrm.rewards",
    # alignment, search and the rewards other trainers call
    "AlignConfig": "dina_lrm.align.config",
    "Aligner": "dina_lrm.align.trainer",
    "RewardSpec": "dina_lrm.align.reward_spec",
    "SearchConfig": "dina_lrm.search_config",
    "Searcher": "dina_lrm.search",
}

__all__ = sorted(_EXPORTS)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dina_lrm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
