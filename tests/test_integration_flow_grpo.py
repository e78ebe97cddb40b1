"""docs/integrations/flow_grpo.md against a replica of flow_grpo's call pattern: rewards built by
``multi_score(device, score_dict)``, called from a pool of 8 threads with several batches in flight
(``executor.submit(reward_fn, images, prompts, prompt_metadata, only_strict=True)``), the sampled
latents stacked to (B, T+1, C, h, w), and the latent reward submitted beside ``multi_score``."""

from concurrent import futures

import numpy as np
import pytest
import torch

from dina_lrm import Scorer
from dina_lrm.rewards import flow_grpo_latent_reward, flow_grpo_reward

PROMPTS = [f"{count} {colour} {shape}" for count in ("a", "two") for colour in ("red", "blue", "green") for shape in ("circle", "square")]


def multi_score(device, score_dict, score_functions):
    """flow_grpo's rewards.multi_score, reduced to what the call pattern needs."""
    score_fns = {name: score_functions[name](device) if "device" in score_functions[name].__code__.co_varnames
                 else score_functions[name]() for name in score_dict}

    def _fn(images, prompts, metadata, only_strict=True):
        details, total = {}, None
        for name, weight in score_dict.items():
            scores, _ = score_fns[name](images, prompts, metadata)
            details[name] = scores
            total = weight * np.asarray(scores) if total is None else total + weight * np.asarray(scores)
        details["avg"] = total
        return details, {}

    return _fn


def sample_batch(number: int, batch: int, steps: int, scorer: Scorer):
    """What ``pipeline_with_logprob`` returns: decoded images, a list of T+1 latents, log-probs."""
    generator = torch.Generator().manual_seed(number)
    trajectory = [torch.randn(batch, 4, 8, 8, generator=generator) for _ in range(steps + 1)]
    images = torch.rand(batch, 3, 32, 32, generator=generator)
    prompts = [PROMPTS[(number * batch + i) % len(PROMPTS)] for i in range(batch)]
    states, pooled = scorer.prompt_encoder(prompts)
    return images, trajectory, prompts, states, pooled


@pytest.fixture(scope="module")
def scorer(reward_dir, pipeline_dir):
    return Scorer.from_pretrained(reward_dir, pipeline_dir)


def test_the_documented_wiring_under_flow_grpos_thread_pool(reward_dir, pipeline_dir, scorer):
    reward_fn = multi_score("cpu", {"dina_lrm": 1.0}, {"dina_lrm": flow_grpo_reward(reward_dir, pipeline_dir, u=0.1, seed=0)})
    dina_fn = flow_grpo_latent_reward(reward_dir, pipeline_dir, u=0.4, seed=0)("cpu")
    executor = futures.ThreadPoolExecutor(max_workers=8)
    batch, steps, samples = 4, 3, []  # T + 1 == batch: the shape trap of latents[-1]
    for number in range(8):
        images, trajectory, prompts, states, pooled = sample_batch(number, batch, steps, scorer)
        latents = torch.stack(trajectory, dim=1)  # (B, T+1, C, h, w), as train_sd3.py stacks them
        rewards = executor.submit(reward_fn, images, prompts, [{} for _ in prompts], only_strict=True)
        dina_rewards = executor.submit(dina_fn, latents[:, -1], prompts, [{} for _ in prompts],
                                       prompt_embeds=states, pooled_prompt_embeds=pooled)
        samples.append((images, latents, prompts, rewards, dina_rewards))
    for images, latents, prompts, rewards, dina_rewards in samples:
        details, _ = rewards.result()
        dina_scores, _ = dina_rewards.result()
        avg = np.asarray(details["avg"]) + 1.0 * dina_scores
        expected_images = scorer.score(prompts, images=images, u=0.1, seed=0).normalized.numpy()
        expected_latents = scorer.score(prompts, latents=latents[:, -1], u=0.4, seed=0).normalized.numpy()
        np.testing.assert_allclose(details["dina_lrm"], expected_images, atol=1e-5)
        np.testing.assert_allclose(dina_scores, expected_latents, atol=1e-5)
        np.testing.assert_allclose(avg, expected_images + expected_latents, atol=1e-5)
    executor.shutdown()


def test_stacked_trajectories_are_refused(reward_dir, pipeline_dir, scorer):
    dina_fn = flow_grpo_latent_reward(reward_dir, pipeline_dir)("cpu")
    _, trajectory, prompts, states, pooled = sample_batch(0, 4, 3, scorer)
    latents = torch.stack(trajectory, dim=1)
    with pytest.raises(ValueError, match=r"stacked trajectories .* latents\[:, -1\]"):
        dina_fn(latents, prompts, {}, prompt_embeds=states, pooled_prompt_embeds=pooled)
    with pytest.raises(ValueError, match="4 latents for 3 prompts"):
        dina_fn(latents[:, -1], prompts[:3], {})
