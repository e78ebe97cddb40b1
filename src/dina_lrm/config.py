"""Typed configuration, loaded from YAML or JSON.

The dataclasses below are the one source of truth for defaults; they are the release's
(SD3.5-Medium, 12 layers, taps 4/8/12, LoRA r64/alpha128, 4 queries, 8 heads). The keys are the
release's training YAML keys, so its ``config.json`` loads unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclass
class LoraSettings:
    r: int = 64
    lora_alpha: int = 128
    init_lora_weights: str | bool = "gaussian"
    lora_dropout: float = 0.0


@dataclass
class RewardHeadConfig:
    use_proj_in: bool = False
    width: int = -1  # -1: the backbone's hidden size
    out_dim: int = 1
    num_queries: int = 4
    num_attn_heads: int = 8
    dropout: float = 0.0


@dataclass
class ModelConfig:
    model_type: str = "thurstone"  # the preference loss the reward model is trained with
    backbone: str = "sd3"
    backbone_model_id: str = "stabilityai/stable-diffusion-3.5-medium"
    num_transformer_layers: int = 12
    freeze_backbone: bool = False
    use_lora: bool = True
    use_text_features: bool = True
    lora_config: LoraSettings = field(default_factory=LoraSettings)
    use_logistic: bool = False
    visual_head_idx: list[int] = field(default_factory=lambda: [4, 8, 12])
    text_head_idx: list[int] = field(default_factory=lambda: [4, 8, 12])
    use_t_embed: bool = True  # accepted for release compatibility; the head always uses temb
    reward_head: RewardHeadConfig = field(default_factory=RewardHeadConfig)
    use_ema: bool = True
    ema_decay: float = 0.995

    @property
    def backbone_mode(self) -> str:
        """'lora', 'frozen' (head only) or 'full' (every backbone weight trains)."""
        if self.use_lora:
            return "lora"
        return "frozen" if self.freeze_backbone else "full"

    @property
    def visual_taps(self) -> list[int]:
        return list(self.visual_head_idx)

    @property
    def text_taps(self) -> list[int]:
        return list(self.text_head_idx) if self.use_text_features else []

    def validate(self) -> None:
        from dina_lrm.losses import LOSSES

        if self.model_type not in LOSSES:
            raise ConfigError(f"model.model_type {self.model_type!r} is not a known loss; choose one of {sorted(LOSSES)}")
        if self.num_transformer_layers < 1:
            raise ConfigError(f"model.num_transformer_layers must be >= 1, got {self.num_transformer_layers}")
        if not self.visual_head_idx:
            raise ConfigError("model.visual_head_idx must name at least one tap")
        for name, taps in (("visual_head_idx", self.visual_head_idx), ("text_head_idx", self.text_taps)):
            if list(taps) != sorted(set(taps)):
                raise ConfigError(f"model.{name} must be strictly increasing, got {list(taps)}")
            bad = [t for t in taps if not 0 <= t <= self.num_transformer_layers]
            if bad:
                raise ConfigError(
                    f"model.{name} has taps {bad} beyond the {self.num_transformer_layers} kept layers "
                    f"(valid taps: 0..{self.num_transformer_layers}, 0 = embeddings before any block)"
                )
        if self.use_logistic:
            raise ConfigError(
                "model.use_logistic=true is not supported: the release stores its logistic parameters outside "
                "rm_head.pt, so such a checkpoint cannot be scored faithfully"
            )


@dataclass
class TrainingConfig:
    mixed_precision: str = "bf16"
    gradient_accumulation_steps: int = 1
    num_epochs: int = 1
    uncond_prob: float = 0.0
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    lr_scheduler: str = "constant"
    max_grad_norm: float = 1.0
    t_weighting_scheme: str = "uniform"
    t_weighting_scheme_param: float = 0.0
    use_vae: bool = False
    add_noise: bool = True


@dataclass
class DiNaConfig:
    """The whole configuration file: the release's sections, ``model`` and ``training`` typed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Any] = field(default_factory=dict)
    logging: dict[str, Any] = field(default_factory=dict)
    system: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DiNaConfig":
        config = from_dict(cls, raw)
        config.model.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls: type, raw: Any, where: str = ""):
    """Build dataclass ``cls`` from ``raw``; unknown keys fail with the nearest valid key."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        hint = hints[key]
        values[key] = from_dict(hint, value, path) if dataclasses.is_dataclass(hint) else value
    return cls(**values)


def load_config(path: str | Path) -> DiNaConfig:
    """Read a YAML or JSON configuration file (the release's ``config.json`` included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse {path}: {err}") from err
    return DiNaConfig.from_dict(raw or {})
