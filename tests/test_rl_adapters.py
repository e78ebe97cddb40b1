"""Flow-GRPO / DiffusionNFT reward factories, and offline loading."""

import socket

import numpy as np
import pytest
import torch
from helpers import make_latents

from dina_lrm import Scorer
from dina_lrm.rewards import flow_grpo_latent_reward, flow_grpo_reward


@pytest.fixture(scope="module")
def scorer(reward_dir, pipeline_dir):
    return Scorer.from_pretrained(reward_dir, pipeline_dir)


def test_image_factory_equals_the_scorer(reward_dir, pipeline_dir, scorer):
    fn = flow_grpo_reward(reward_dir, pipeline_dir, u=0.1, seed=3)("cpu")
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square", "a red circle"]
    scores, info = fn(images, prompts, [{} for _ in prompts])
    expected = scorer.score(prompts, images=images, u=0.1, seed=3)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (3,)
    np.testing.assert_allclose(scores, expected.normalized.numpy(), atol=1e-5)
    np.testing.assert_allclose(info["raw"], expected.raw.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="NCHW"):
        fn(images.permute(0, 2, 3, 1), prompts, {})


def test_latent_factory_with_pipeline_embeddings_skips_text_encoding(reward_dir, pipeline_dir, scorer):
    fn = flow_grpo_latent_reward(reward_dir, pipeline_dir, seed=1, scale="raw")("cpu")
    latents, prompts = make_latents(2), ["a green triangle", "two circles"]
    states, pooled = scorer.prompt_encoder(prompts)
    scores, _ = fn(latents, ["ignored", "ignored"], {}, prompt_embeds=states, pooled_prompt_embeds=pooled)
    by_prompts, _ = fn(latents, prompts, {})
    expected = scorer.score(prompts, latents=latents, u=0.4, seed=1).raw.numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    np.testing.assert_allclose(by_prompts, expected, atol=1e-5)
    with pytest.raises(ValueError, match="both prompt_embeds and pooled_prompt_embeds"):
        fn(latents, prompts, {}, prompt_embeds=states)


def test_factories_refuse_unknown_scale_and_dtype(reward_dir, pipeline_dir):
    with pytest.raises(ValueError, match="score scale"):
        flow_grpo_reward(reward_dir, pipeline_dir, scale="logit")
    with pytest.raises(ValueError, match="dtype"):
        flow_grpo_latent_reward(reward_dir, pipeline_dir, dtype="fp8")("cpu")


def test_loading_from_local_directories_makes_no_network_call(reward_dir, pipeline_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    scorer = Scorer.from_pretrained(reward_dir, pipeline_dir)
    assert torch.isfinite(scorer.score("a cat", latents=make_latents(1), seed=0).raw).all()
