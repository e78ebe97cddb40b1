"""Typed configuration, loaded from YAML or JSON.

The dataclasses below are the one source of truth for defaults; they are the release's
(SD3.5-Medium, 12 layers, taps 4/8/12, LoRA r64/alpha128, 4 queries, 8 heads). The keys are the
release's training YAML keys, so its ``config.json`` loads unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import importlib.util
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the precisions every command accepts
AUTOCAST_NAMES = ("bf16", "fp16")  # the backbone under autocast in half precision, the head in the model's dtype
TEXT_ENCODER_MODES = ("device", "cpu", "none")  # where a scorer's text encoders live ("none": not loaded, embeddings only)


# The default noise level u to score at, one per kind of input: a generator's own clean latents
# (what RL rollouts and latent clients pass), or images that went through pixels (files, decoded
# samples), whose VAE round trip the reward did not train on and which read best a little noised.
LATENT_U = 0.4
IMAGE_U = 0.1
SAMPLING_SCHEMES = ("uniform", "logit_normal", "mode", "beta", "power", "constant")  # how training draws u (noise.py)


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


# Settings declared once: a config field carries its help text and CLI flags, and the CLI is generated
# from the dataclass (add_config_arguments), read back through one path (load_settings).

def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            flags: tuple[str, ...] = (), choices: tuple | None = None, parse: Callable[[str], Any] | None = None,
            metavar: str | None = None, append: bool = False):
    """A config field with its help text and, optionally, how the CLI sets it: ``flags`` (default
    ``--field-name``), ``choices``, ``parse`` (a string -> value for each item), ``append`` (the flag is
    repeated once per list item instead of taking several values)."""
    metadata = {"help": help, "flags": flags, "choices": choices, "parse": parse, "metavar": metavar, "append": append}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class LoraSettings:
    r: int = setting(64, "LoRA rank of every adapted backbone projection")
    lora_alpha: int = setting(128, "LoRA scale numerator (the update is scaled by lora_alpha / r)")
    init_lora_weights: str | bool = setting("gaussian", "PEFT's LoRA initialisation (gaussian, true, ...)", parse=str)
    lora_dropout: float = setting(0.0, "dropout on the LoRA path")


@dataclass
class RewardHeadConfig:
    use_proj_in: bool = setting(False, "project the tapped features before the head's attention")
    width: int = setting(-1, "the head's width; -1: the backbone's hidden size")
    out_dim: int = setting(1, "scores per item")
    num_queries: int = setting(4, "learned queries that read the tapped tokens")
    num_attn_heads: int = setting(8, "attention heads of the head")
    dropout: float = setting(0.0, "dropout in the head")
    t_emb_dim: int | None = setting(None, "in the authors' Z-Image YAML (their code ignores it); when set, must equal the backbone's")


@dataclass
class ModelConfig:
    model_type: str = setting("thurstone", "the preference loss the reward model is trained with (thurstone, bt, ...)")
    backbone: str = setting("", "sd3, flux, zimage or qwenimage; empty: picked from the transformer's class")
    backbone_model_id: str = setting("stabilityai/stable-diffusion-3.5-medium", "the generator whose transformer is the backbone")
    num_transformer_layers: int = setting(12, "transformer blocks kept (the reward reads no block past them)")
    freeze_backbone: bool = setting(False, "without LoRA: train the head only (true) or every backbone weight (false)")
    use_lora: bool = setting(True, "train LoRA adapters in the kept blocks")
    use_text_features: bool = setting(True, "the head reads the text stream's tapped tokens too")
    lora_config: LoraSettings = field(default_factory=LoraSettings)
    use_logistic: bool = setting(False, "the release's logistic output (not supported: its parameters live outside rm_head.pt)")
    visual_head_idx: list[int] = setting(factory=lambda: [4, 8, 12], help="blocks whose image tokens the head reads (0: the embeddings)")
    text_head_idx: list[int] = setting(factory=lambda: [4, 8, 12], help="blocks whose text tokens the head reads")
    use_t_embed: bool = setting(True, "accepted for release compatibility; the head always uses the time embedding")
    reward_head: RewardHeadConfig = field(default_factory=RewardHeadConfig)
    # The release YAML's EMA keys sit here, where its trainer never reads them (it reads training.use_ema):
    # the released checkpoint was trained without EMA. Accepted unchanged, inert, named by a warning.
    use_ema: bool = setting(False, "inert, as in the release's trainer (set training.use_ema)")
    ema_decay: float = setting(0.995, "inert, as in the release's trainer (set training.ema_decay)")

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


MIXED_PRECISION = ("fp32", "no", "bf16", "fp16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine")  # diffusers' names; warmup_steps applies to the last two


@dataclass
class TrainingConfig:
    mixed_precision: str = setting("bf16", "fp32 (or no), bf16 or fp16", choices=MIXED_PRECISION)
    gradient_accumulation_steps: int = setting(1, "micro-steps per optimizer step")
    num_epochs: int = setting(1, "passes over the training pairs")
    max_steps: int = setting(-1, "> 0: stop after this many optimizer steps (overrides num_epochs)")
    uncond_prob: float = setting(0.0, "deprecated in the release; only 0 is accepted")
    learning_rate: float = setting(5e-5, "AdamW learning rate")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup_steps: int = setting(0, "linear warmup of constant_with_warmup and cosine; inert with constant, as in the release")
    lr_scheduler: str = setting("constant", "constant (the release: no schedule at all), constant_with_warmup or cosine",
                                choices=LR_SCHEDULERS)
    max_grad_norm: float = setting(1.0, "gradient clipping norm")
    t_weighting_scheme: str = setting("uniform", "how training draws the noise level u", choices=SAMPLING_SCHEMES)
    t_weighting_scheme_param: float = setting(0.0, "the scheme's parameter (e.g. logit-normal's mean)")
    use_vae: bool = setting(False, "the release's flag for encoding pixels while training (not supported: encode once with prepare)")
    add_noise: bool = setting(True, "noise the latents to u before scoring (false: score clean latents)")
    gradient_checkpointing: bool = setting(False, "recompute each kept block in the backward pass (less memory, more compute)")
    use_ema: bool = setting(False, "evaluate and save an EMA of the trained weights (the release trained without)")
    ema_decay: float = setting(0.995, "the EMA's decay (diffusers' EMAModel)")

    def validate(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"training.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"training.lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.t_weighting_scheme not in SAMPLING_SCHEMES:
            raise ConfigError(f"training.t_weighting_scheme must be one of {SAMPLING_SCHEMES}, got {self.t_weighting_scheme!r}")
        if self.uncond_prob != 0.0:
            raise ConfigError("training.uncond_prob is deprecated in the release (it did not help); only 0.0 is accepted")
        if self.use_vae:
            raise ConfigError("training.use_vae=true is not supported: encode images once with `dina-lrm prepare`")
        for name in ("gradient_accumulation_steps", "num_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainDataConfig:
    """The release's ``data.train`` keys. ``parquet_files``: shard directories written by
    ``dina-lrm prepare``, or the authors' preprocessed ``part_rank*.parquet`` files; names or globs."""

    parquet_files: str | list[str] = setting("", "shard directories of dina-lrm prepare, or the authors' part_rank*.parquet files (names or globs)")
    bucket_file: str | None = setting(None, "the authors' bucket_index.csv for their parquet files; our shards carry each pair's bucket")
    base_batch_size: int = setting(4, "pairs per process per micro-step")
    reference_size: int = setting(1024, "the resolution the aspect buckets are sized for")
    num_workers: int = setting(0, "data loader worker processes")
    shuffle: bool = setting(True, "shuffle batches each epoch (seeded)")
    seed: int = setting(42, "the data order's seed")
    use_dynamic_bsz: bool = setting(False, "the release's dynamic batch size (not supported)")
    max_sequence_length: int = setting(128, "T5 tokens when prompts are encoded during training (no cached embeddings)")

    def validate(self) -> None:
        if self.use_dynamic_bsz:
            raise ConfigError("data.train.use_dynamic_bsz=true is not supported: a batch holds base_batch_size pairs of one bucket")
        if self.base_batch_size < 1:
            raise ConfigError(f"data.train.base_batch_size must be >= 1, got {self.base_batch_size}")


@dataclass
class EvalDataConfig:
    """One named evaluation set (the release's ``data.eval.<name>``)."""

    parquet_files: str | list[str] = ""
    batch_size: int = 16
    num_workers: int = 0
    shuffle: bool = False


@dataclass
class DataConfig:
    train: TrainDataConfig = field(default_factory=TrainDataConfig)
    eval: dict[str, EvalDataConfig] = field(default_factory=dict)


@dataclass
class PathsConfig:
    run_name: str = setting("SD35M-Thurstone-12layers", "the run's folder under save_dir")
    save_dir: str = setting("outputs", "where runs are written")

    @property
    def run_dir(self) -> Path:
        return Path(self.save_dir) / self.run_name


@dataclass
class LoggingConfig:
    eval_frac: int = setting(1000, "the release's name: evaluate every this many optimizer steps")
    save_frac: int = setting(2000, "checkpoint every this many optimizer steps")
    log_every: int = setting(10, "log every this many optimizer steps")
    report_to: str = setting("tensorboard", "tensorboard, wandb or none", choices=("tensorboard", "wandb", "none"))
    eval_u: list[float] = setting(factory=lambda: [0.2, 0.4, 0.6, 0.8], help="noise levels of the held-out accuracy")
    checkpoints_total_limit: int = setting(0, "keep only the newest N training-state checkpoints (0: keep all)")

    def validate(self) -> None:
        if self.report_to not in ("tensorboard", "wandb", "none"):
            raise ConfigError(f"logging.report_to must be tensorboard, wandb or none, got {self.report_to!r}")
        if self.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.report_to=wandb needs the wandb package: pip install wandb")
        for name in ("eval_frac", "save_frac", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"logging.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SystemConfig:
    seed: int = setting(42, "the run's seed (weights, noise draws)")


@dataclass
class DiNaConfig:
    """The whole configuration file, with the release's sections and keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    system: SystemConfig = field(default_factory=SystemConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DiNaConfig:
        config = from_dict(cls, raw)
        config.validate()
        return config

    def validate(self) -> None:
        self.model.validate()
        self.training.validate()
        self.data.train.validate()
        self.logging.validate()

    def inert_release_keys(self) -> list[str]:
        """The keys set here that the authors' trainer reads nowhere (so the release was trained without
        them), each with what to set instead; a run with this config ignores them too."""
        inert = []
        if self.model.use_ema:
            inert.append("model.use_ema (it reads training.use_ema; set that to train with EMA)")
        if self.training.lr_scheduler == "constant" and self.training.warmup_steps:
            inert.append(f"training.warmup_steps={self.training.warmup_steps} (lr_scheduler: constant builds no schedule; "
                         "constant_with_warmup warms up)")
        return inert

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        if raw["model"]["reward_head"]["t_emb_dim"] is None:  # the authors' head takes every other key as an argument
            del raw["model"]["reward_head"]["t_emb_dim"]
        return raw


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
        values[key] = _typed(hints[key], value, path)
    return cls(**values)


def _typed(hint, value: Any, path: str):
    """``value`` as a dataclass (also an optional one), or as a list or dict of dataclasses, where the type hint asks for one."""
    optional = [arg for arg in typing.get_args(hint) if arg is not type(None)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else []
    if len(optional) == 1 and dataclasses.is_dataclass(optional[0]):
        return None if value is None else from_dict(optional[0], value, path)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if hint in (float, float | None) and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{path} must be a number, got {value!r}") from None
    if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list of sections, got {type(value).__name__}")
        return [from_dict(typing.get_args(hint)[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of names to sections, got {type(value).__name__}")
        return {name: from_dict(typing.get_args(hint)[1], section, f"{path}.{name}") for name, section in value.items()}
    return value


def settings_differences(old: dict, new: dict) -> list[str]:
    """``"key: old -> new"`` for every dotted key whose value differs between two nested settings dicts."""
    flat_old, flat_new = flatten_config(old), flatten_config(new)
    keys = sorted(set(flat_old) | set(flat_new))
    return [f"{key}: {flat_old.get(key)!r} -> {flat_new.get(key)!r}" for key in keys if flat_old.get(key) != flat_new.get(key)]


def config_differences(a: DiNaConfig, b: DiNaConfig) -> list[str]:
    """:func:`settings_differences` of two configurations."""
    return settings_differences(a.to_dict(), b.to_dict())


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """Nested mapping -> ``{"section.key": value}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``section.key=value`` overrides (values parsed as YAML) in a raw config mapping."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(text)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> DiNaConfig:
    """Read a YAML or JSON configuration file (the release's ``config.json`` included), then apply
    ``section.key=value`` overrides."""
    return load_settings(DiNaConfig, path, None, overrides or [])


def import_object(spec: str, what: str = "target"):
    """The object named by ``module:attr`` or ``path/file.py:attr`` (plug-in rewards and the like)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target:
        raise ValueError(f"{what} {spec!r} must look like module:attr or file.py:attr")
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise FileNotFoundError(f"{what} file not found: {target}")
        module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"{what} {spec!r}: cannot import {target} ({err})") from err
    if not hasattr(module, attr):
        raise ValueError(f"{what} {spec!r}: {target} has no attribute {attr!r}")
    return getattr(module, attr)


def parse_levels(text: str) -> list[float]:
    """``"0.2,0.4,0.6"`` -> ``[0.2, 0.4, 0.6]``."""
    try:
        return [float(u) for u in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated noise levels like 0.2,0.4,0.6, got {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, sections: bool = False, prefix: str = "",
                         defaults=None) -> None:
    """One flag per field of ``cls`` declared with :func:`setting`; its help and default come from the
    field. Flags default to None, so only the flags given override a ``--config`` file. With
    ``sections``, the fields of nested config sections get flags too, named by their dotted key
    (``--training.learning_rate``, as the YAML spells it; booleans also take ``--no-...``). ``defaults``:
    the instance whose values the help shows (a section's own default, e.g. a run's data settings)."""
    hints = typing.get_type_hints(cls)
    defaults = cls() if defaults is None else defaults
    for item in dataclasses.fields(cls):
        hint = _without_none(hints[item.name])
        if sections and dataclasses.is_dataclass(hint) and "help" not in item.metadata:
            add_config_arguments(parser, hint, sections=True, prefix=f"{prefix}{item.name}.", defaults=getattr(defaults, item.name))
        elif "help" in item.metadata:
            parser.add_argument(*_flags(item, prefix), **_flag_options(item, hint, prefix, getattr(defaults, item.name)))


def _flags(item: dataclasses.Field, prefix: str) -> tuple[str, ...]:
    if item.metadata["flags"]:
        return item.metadata["flags"]
    return (f"--{prefix}{item.name}",) if prefix else (f"--{item.name.replace('_', '-')}",)


def _flag_options(item: dataclasses.Field, hint, prefix: str, default) -> dict:
    meta = item.metadata
    shown = "" if "default" in meta["help"] else f" (default: {_shown(default)})"
    options = {"dest": prefix + item.name, "default": None, "help": meta["help"] + shown}
    if hint is bool:
        # a flat flag turns the default over; a section's key is set either way (--key / --no-key)
        options["action"] = argparse.BooleanOptionalAction if prefix else ("store_false" if default else "store_true")
        return options
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # str | list[str]: one or several; str | bool: text
        hint = next((arg for arg in typing.get_args(hint) if typing.get_origin(arg) is list), str)
    element = typing.get_args(hint)[0] if typing.get_origin(hint) in (list, tuple) else None
    options["type"] = meta["parse"] or (element if element is not None else hint)
    whole_list = meta["parse"] is not None and element is not None and typing.get_origin(element) is None  # "0.6,0.3"
    if element is not None and not whole_list:
        options.update(action="append") if meta["append"] else options.update(nargs="+")
    if meta["choices"] is not None:
        options["choices"] = meta["choices"]
    options["metavar"] = meta["metavar"] or _flags(item, prefix)[0].lstrip("-").replace("-", "_").split(".")[-1].upper()
    return options


def load_settings(cls: type, config_path: str | Path | None = None, flags: dict | None = None, overrides: list[str] = (),
                  defaults: dict | None = None):
    """``cls`` from ``defaults`` (a recipe's keys), then a YAML file (or JSON, the release's
    ``config.json``), overridden by the flags given (``flags``: parsed values by field name or dotted key,
    None for a flag not given) and then by ``section.key=value`` overrides, validated: the one path
    every command's settings take."""
    raw = {**(defaults or {}), **(_read_settings_file(Path(config_path)) if config_path else {})}
    top = {item.name for item in dataclasses.fields(cls)}
    for key, value in (flags or {}).items():
        if value is not None and key.split(".")[0] in top:
            _set_dotted(raw, key, value)
    config = from_dict(cls, apply_overrides(raw, list(overrides)))
    if hasattr(config, "validate"):
        config.validate()
    return config


def _read_settings_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot parse {path}: {err}") from err
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return raw or {}


def _set_dotted(raw: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = list(value) if isinstance(value, tuple) else value


def _without_none(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _shown(value) -> str:
    if isinstance(value, list):
        return " ".join(",".join(f"{u:g}" for u in v) if isinstance(v, list) else str(v) for v in value) or "none"
    return "none" if value in (None, "") else str(value)
