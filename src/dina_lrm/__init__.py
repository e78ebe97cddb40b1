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
    "DTYPE_NAMES": "dina_lrm.config",
    # settings declared once, for a plug-in's own commands (as the toy world's)
    "setting": "dina_lrm.config",
    "add_config_arguments": "dina_lrm.config",
    "load_settings": "dina_lrm.config",
    # the model and scoring
    "CheckpointError": "dina_lrm.models.checkpoint",
    "DiNaLRM": "dina_lrm.models.reward_model",
    "Scorer": "dina_lrm.scorer",
    "ScoreResult": "dina_lrm.scorer",
    "NonFiniteScoreError": "dina_lrm.scorer",
    "normalize_score": "dina_lrm.scorer",
    "load_pipeline": "dina_lrm.pipelines",
    "DTYPES": "dina_lrm.pipelines",
    "SD3PromptEncoder": "dina_lrm.models.sd3_text",
    "CachedPromptEncoder": "dina_lrm.models.prompt_cache",
    "policy_for": "dina_lrm.models.backbones",
    "SigmaTable": "dina_lrm.noise",
    "NoiseSampler": "dina_lrm.noise",
    "add_noise": "dina_lrm.noise",
    "vae_encode": "dina_lrm.data.images",
    "vae_decode": "dina_lrm.data.images",
    "claim_output": "dina_lrm.outputs",
    # data and training
    "PrepareConfig": "dina_lrm.data.config",
    "prepare": "dina_lrm.data.prepare",
    "PairRecord": "dina_lrm.data.shards",
    "PairTable": "dina_lrm.data.shards",
    "write_preference_shards": "dina_lrm.data.shards",
    "load_preference_shards": "dina_lrm.data.shards",
    "preference_loss": "dina_lrm.losses",
    "PreferenceBatch": "dina_lrm.train.step",
    "StepOutput": "dina_lrm.train.step",
    "draw_noise": "dina_lrm.train.step",
    "preference_step": "dina_lrm.train.step",
    "Trainer": "dina_lrm.train.trainer",
    # evaluation
    "EvalConfig": "dina_lrm.eval.config",
    "evaluate": "dina_lrm.eval.runner",
    "pair_wins": "dina_lrm.eval.pairwise",
    "bootstrap_interval": "dina_lrm.eval.pairwise",
    "count_flops": "dina_lrm.eval.cost",
    "scoring_flops": "dina_lrm.eval.cost",
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
    "build_reward": "dina_lrm.align.reward_spec",
    "initial_noise": "dina_lrm.align.sampling",
    "euler_step": "dina_lrm.align.sampling",
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
