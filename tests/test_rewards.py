"""The one reward protocol: what follows it, what is refused, and the adapters' numbers."""

import numpy as np
import pytest
import torch

from dina_lrm import Scorer
from dina_lrm.rewards import DecodedReward, DiNaReward, FunctionReward, Setting, check_reward


def test_a_plain_function_is_refused_with_the_fix_named_and_adapters_follow_the_protocol():
    with pytest.raises(ValueError, match="wrap a plain function in dina_lrm.rewards.FunctionReward"):
        check_reward(lambda items, prompts, seed: [0.0] * len(items), "--extra-reward x")
    reward = FunctionReward(lambda images, prompts, metadata: [1.0] * len(images), "ones")
    assert check_reward(reward, "x") is reward and reward.inputs == "images" and not reward.differentiable
    with pytest.raises(ValueError, match="not images: it needs no decode"):
        DecodedReward(torch.nn.Identity(), FunctionReward(lambda *a: [0.0], "l", inputs="latents"))
    images_only = lambda images, prompts, metadata: [0.0]  # noqa: E731
    images_only.inputs = "images"
    with pytest.raises(ValueError, match="scores images only"):
        FunctionReward(images_only, "hps", inputs="latents")


def test_a_function_reward_keeps_its_per_sample_info_and_its_graph():
    latents = torch.randn(3, 4, 2, 2, requires_grad=True)

    def brightness(items, prompts, metadata):
        assert metadata == [{}, {}, {}] and prompts == ["a", "b", "c"]
        scores = items.mean(dim=(1, 2, 3))
        return scores, {"doubled": (2 * scores).detach().numpy(), "note": "not per sample", "pair": [1.0, 2.0]}

    reward = FunctionReward(brightness, "brightness", inputs="latents", differentiable=True)
    scores = reward(latents, ["a", "b", "c"], seed=0)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert list(reward.details) == ["doubled"]
    np.testing.assert_allclose(reward.details["doubled"], 2 * scores.detach().numpy(), rtol=1e-6)
    scores.sum().backward()
    torch.testing.assert_close(latents.grad, torch.full_like(latents, 1 / 16))


def test_the_dina_reward_on_images_and_on_latents_equals_the_scorer(reward_dir, pipeline_dir):
    scorer = Scorer.from_pretrained(reward_dir, pipeline_dir)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a cat"]
    expected = scorer.score(prompts, latents=latents, u=0.3, seed=5)
    reward = DiNaReward(scorer, Setting((0.3,)), scale="normalized")
    torch.testing.assert_close(reward(latents, prompts, seed=5), expected.normalized)
    assert reward.name == "DiNa-LRM u=0.3" and reward.inputs == "latents"
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    on_images = DiNaReward(scorer, inputs="images")
    assert on_images.setting.levels == (0.1,)  # IMAGE_U: the default follows the input kind
    torch.testing.assert_close(on_images(images, prompts, seed=5), scorer.score(prompts, images=images, seed=5).raw)
