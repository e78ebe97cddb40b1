"""At the SD3.5-Medium configuration, on the meta device (no memory), our parameter names and
shapes are exactly the released checkpoint's."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from peft import get_peft_model_state_dict

from dina_lrm import DiNaConfig, DiNaLRM
from dina_lrm.config import RewardHeadConfig
from dina_lrm.models.reward_head import RewardHead

# a copy of shared/spec/sd35m_12layer_checkpoint_keys.json, the released checkpoint's key names and shapes
SPEC_PATH = Path(__file__).parent / "data" / "sd35m_12layer_checkpoint_keys.json"


@pytest.fixture(scope="module")
def spec():
    return json.loads(SPEC_PATH.read_text())


@pytest.fixture(scope="module")
def sd35m_model(spec):
    config = {k: v for k, v in spec["backbone_config_sd35_medium"].items()}
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config)
        return DiNaLRM(DiNaConfig(), transformer)


def shapes(state):
    return {k: list(v.shape) for k, v in state.items()}


def test_reward_head_matches_release_names_and_shapes(spec):
    with torch.device("meta"):
        head = RewardHead(RewardHeadConfig(), token_dim=1536, num_visual_taps=3, num_text_taps=3)
    assert shapes(head.state_dict()) == spec["rm_head"]
    assert sum(p.numel() for p in head.parameters()) / 1e6 == pytest.approx(spec["counts"]["rm_head_params_millions"], abs=1e-3)


def test_default_model_matches_release_head_and_lora_adapter(spec, sd35m_model):
    assert shapes(sd35m_model.reward_head.state_dict()) == spec["rm_head"]
    adapter = get_peft_model_state_dict(sd35m_model.backbone)
    assert shapes({f"base_model.model.{k}" if not k.startswith("base_model") else k: v for k, v in adapter.items()}) == spec["lora_adapter"]


def test_kept_backbone_size_matches_release(spec, sd35m_model):
    base = sum(p.numel() for n, p in sd35m_model.base_backbone.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in sd35m_model.base_backbone.named_parameters() if "lora_" in n)
    # the release counts the kept backbone with its LoRA weights
    assert (base + lora) / 1e6 == pytest.approx(spec["counts"]["backbone_12_layers_params_millions"], abs=0.01)
    assert lora / 1e6 == pytest.approx(spec["counts"]["lora_params_millions"], abs=0.01)
