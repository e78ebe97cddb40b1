import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from dina_lrm import DiNaLRM
from dina_lrm.testing.tiny_sd3 import save_tiny_sd3_pipeline
from helpers import ALIGN_PROMPTS, randomize_lora, reset_accelerate, tiny_config


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """A tiny SD3 pipeline written with save_pretrained, loaded by tests through from_pretrained."""
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


@pytest.fixture
def pipe(pipeline_dir):
    return StableDiffusion3Pipeline.from_pretrained(str(pipeline_dir))


@pytest.fixture
def text_inputs():
    torch.manual_seed(1)
    return torch.randn(2, 20, 32), torch.randn(2, 64)


@pytest.fixture(scope="session")
def reward_dir(pipeline_dir, tmp_path_factory):
    """A saved LoRA-mode DiNa-LRM on the tiny pipeline, with non-zero LoRA weights (read-only in tests)."""
    from dina_lrm.pipelines import load_pipeline

    model = DiNaLRM(tiny_config(), load_pipeline(pipeline_dir).transformer)
    randomize_lora(model)
    return model.save_pretrained(tmp_path_factory.mktemp("reward") / "reward")


@pytest.fixture
def prompt_file(tmp_path):
    """The alignment tests' training prompts, one per line."""
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(ALIGN_PROMPTS) + "\n")
    return path


@pytest.fixture
def fresh_accelerate_state():
    yield
    reset_accelerate()
