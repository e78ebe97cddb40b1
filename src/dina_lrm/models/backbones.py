"""Which backbone serves which generator transformer.

A registry of names only: the implementations are imported when a transformer of their class
arrives, so this module and the backbone files never import each other. Adding a backbone is one
file and one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Registered:
    transformer_class: str  # the diffusers class the backbone wraps
    implementation: str  # "module:Class"
    prompt_encoder: str  # "module:Class" of its text conditioning (a CachedPromptEncoder)
    model_ids: tuple[str, ...]  # substrings of the hub ids of its generators (checks backbone_model_id)
    policy: str  # "module:Class" of its policy adapter (how alignment and search drive the generator)


BACKBONES = {
    "sd3": Registered("SD3Transformer2DModel", "dina_lrm.models.sd3:SD3Backbone", "dina_lrm.models.sd3_text:SD3PromptEncoder",
                      ("stable-diffusion-3",), "dina_lrm.models.sd3_policy:SD3Policy"),
    "flux": Registered("FluxTransformer2DModel", "dina_lrm.models.flux:FluxBackbone", "dina_lrm.models.flux_text:FluxPromptEncoder",
                       ("flux",), "dina_lrm.models.flux_policy:FluxPolicy"),
    "zimage": Registered("ZImageTransformer2DModel", "dina_lrm.models.zimage:ZImageBackbone",
                         "dina_lrm.models.zimage_text:ZImagePromptEncoder", ("z-image", "zimage"),
                         "dina_lrm.models.zimage_policy:ZImagePolicy"),
    "qwenimage": Registered("QwenImageTransformer2DModel", "dina_lrm.models.qwenimage:QwenImageBackbone",
                            "dina_lrm.models.qwenimage_text:QwenImagePromptEncoder", ("qwen-image", "qwenimage"),
                            "dina_lrm.models.qwenimage_policy:QwenImagePolicy"),
}


def _load(target: str) -> type:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def backbone_name(transformer: nn.Module) -> str:
    """The registered name of the backbone for ``transformer``'s class."""
    found = next((key for key, entry in BACKBONES.items() if entry.transformer_class == type(transformer).__name__), None)
    if found is None:
        supported = ", ".join(f"{entry.transformer_class} ({key})" for key, entry in BACKBONES.items())
        raise ValueError(f"no backbone for a {type(transformer).__name__}; supported transformers: {supported}")
    return found


def latent_patch_size(transformer: nn.Module) -> int:
    """Latent sides must be multiples of this for the backbone of ``transformer`` (FLUX packs 2x2)."""
    return _load(BACKBONES[backbone_name(transformer)].implementation).latent_patch_size(transformer.config)


def prompt_encoder_for(transformer: nn.Module) -> type:
    """The text conditioning class of the generator ``transformer`` belongs to."""
    return _load(BACKBONES[backbone_name(transformer)].prompt_encoder)


def policy_for(pipe, max_sequence_length: int | None = None):
    """The policy adapter of ``pipe``'s generator family (see ``models/policy.py``)."""
    return _load(BACKBONES[backbone_name(pipe.transformer)].policy)(pipe, max_sequence_length)


def backbone_for(transformer: nn.Module, name: str = "", model_id: str = "") -> type:
    """The backbone class for ``transformer``, picked from its class. ``name`` (the config's
    ``model.backbone``, may be empty) and ``model_id`` (``model.backbone_model_id``) must agree with it."""
    if name and name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}")
    found = backbone_name(transformer)
    if name and name != found:
        raise ValueError(f"the config names backbone {name!r} but the transformer is a {type(transformer).__name__} ({found})")
    family = next((key for key, entry in BACKBONES.items() if any(part in model_id.lower() for part in entry.model_ids)), None)
    if family is not None and family != found:
        raise ValueError(f"model.backbone_model_id {model_id!r} is a {family} generator, but the transformer is a "
                         f"{type(transformer).__name__} ({found})")
    return _load(BACKBONES[found].implementation)
