"""Alignment: the SDE step's log-probability, advantages, the clipped objective, GRPO and DRaFT on a
tiny generator, resume, and bad configurations."""

import math
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from dina_lrm.align.advantages import group_advantages
from dina_lrm.align.config import AlignConfig
from dina_lrm.align.methods.grpo import clipped_policy_loss
from dina_lrm.rewards import DecodedReward, FunctionReward
from dina_lrm.align.sampling import initial_noise, sample_ode, sample_sde
from dina_lrm.align.sde import gaussian_kl, sde_step
from dina_lrm.align.trainer import Aligner
from dina_lrm.config import ConfigError
from dina_lrm.models.backbones import policy_for
from dina_lrm.models.policy import TextConditioning
from dina_lrm.pipelines import load_pipeline


def test_sde_step_log_prob_is_the_closed_form_gaussian():
    generator = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    sigma, sigma_next, level = 0.6, 0.45, 0.7
    step = sde_step(x, v, sigma, sigma_next, level, 0.9, generator=generator, likelihood="gaussian")
    std_t = level * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = std_t * math.sqrt(-dt)
    expected = torch.distributions.Normal(mean, std).log_prob(step.sample).flatten(1).mean(dim=1)
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.log_prob, expected)
    again = sde_step(x, v, sigma, sigma_next, level, 0.9, next_sample=step.sample)
    torch.testing.assert_close(again.log_prob, step.log_prob)
    # the empirical spread of many draws is the step's std
    draws = torch.stack([sde_step(x, v, sigma, sigma_next, level, 0.9, generator=generator).sample for _ in range(2000)])
    assert draws.std(dim=0).mean().item() == pytest.approx(std, rel=0.05)


def test_sde_step_at_sigma_one_uses_the_next_sigma_and_zero_noise_is_euler():
    x, v = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    step = sde_step(x, v, 1.0, 0.8, 0.5, 0.9, generator=torch.Generator().manual_seed(0))
    assert step.std[0, 0, 0, 0].item() == pytest.approx(0.5 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.2))
    euler = sde_step(x, v, 1.0, 0.8, 0.0, 0.9)
    torch.testing.assert_close(euler.sample, x - 0.2 * v)
    assert euler.log_prob is None
    with pytest.raises(ValueError, match="decrease"):
        sde_step(x, v, 0.5, 0.6, 0.5, 0.9)


def test_gaussian_kl_matches_torch_distributions():
    mean, reference, std = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.full((2, 1, 1), 0.3)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(reference, std))
    torch.testing.assert_close(gaussian_kl(mean, reference, std), expected.flatten(1).mean(dim=1))


def test_group_advantages_are_normalised_within_each_prompt():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    advantages = group_advantages(rewards, group_size=3, eps=1e-12)
    root = math.sqrt(1.5)  # 1 / population std of (1, 2, 3)
    torch.testing.assert_close(advantages[:3], torch.tensor([-root, 0.0, root]))
    torch.testing.assert_close(advantages[3:], torch.zeros(3))
    assert group_advantages(torch.tensor([0.0, 100.0]), 2, clip=0.5).abs().max() == 0.5
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(rewards, group_size=1)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_global_std_keeps_near_equal_groups_near_zero():
    """Four near-equal judge scores are noise: the group's own std blows them up to +-1, the batch's does not."""
    rewards = torch.tensor([0.961, 0.962, 0.961, 0.962, 0.2, 0.9, 0.4, 0.7])
    own = group_advantages(rewards, 4, clip=None)
    shared = group_advantages(rewards, 4, clip=None, global_std=True)
    assert own[:4].abs().min() > 0.8
    batch_std = math.sqrt(sum((r - sum(rewards.tolist()) / 8) ** 2 for r in rewards.tolist()) / 8)
    torch.testing.assert_close(shared[:4], (rewards[:4] - 0.9615) / (batch_std + 1e-4), atol=1e-5, rtol=1e-4)
    assert shared[:4].abs().max() < 0.01


def test_mixed_advantages_weight_each_rewards_own_normalisation():
    main, proxy = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0]), torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 1.0])
    mixed = group_advantages([main, proxy], 3, weights=[1.0, 0.2], clip=None, eps=1e-12)
    root = math.sqrt(1.5)
    proxy_group = [-1 / math.sqrt(2), -1 / math.sqrt(2), math.sqrt(2)]  # (0, 0, 1): mean 1/3, population std sqrt(2)/3
    expected = [-root + 0.2 * root, 0.0, root - 0.2 * root] + [0.2 * a for a in proxy_group]
    torch.testing.assert_close(mixed, torch.tensor(expected))
    with pytest.raises(ValueError, match="2 advantage weights for 1 rewards"):
        group_advantages([main], 3, weights=[1.0, 0.2])


def test_clipped_objective_gradient_sign_and_clipping():
    old = torch.zeros(2)
    advantages = torch.tensor([1.0, -1.0])
    log_prob = torch.zeros(2, requires_grad=True)
    loss, clipped = clipped_policy_loss(log_prob, old, advantages, clip_range=0.2)
    loss.backward()
    # descending the loss raises the log-probability of the positive-advantage sample, lowers the other
    assert log_prob.grad[0] < 0 < log_prob.grad[1]
    assert clipped == 0
    # beyond the clip range in the advantage's direction the gradient vanishes
    log_prob = torch.tensor([0.5, -0.5], requires_grad=True)
    loss, clipped = clipped_policy_loss(log_prob, old, advantages, clip_range=0.2)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.zeros(2))
    assert clipped == 1.0


def make_config(pipeline_dir, reward_dir, prompt_file, out, **overrides) -> AlignConfig:
    raw = dict(generator=str(pipeline_dir), reward={"kind": "dina", "path": str(reward_dir)}, prompts=str(prompt_file),
               num_eval_prompts=4, out=str(out), max_steps=4, prompts_per_step=2, train_sampling_steps=4,
               eval_sampling_steps=4, guidance_scale=1.0, eval_every=100, checkpoint_every=2, max_sequence_length=8,
               lora_rank=4, learning_rate=3e-3, grpo={"group_size": 4, "clip_range": 0.01}, nft={"group_size": 4})
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return AlignConfig.from_dict(raw)


class FirstChannelReward:
    """A latent reward with an unambiguous direction: the mean of latent channel 0."""

    name, differentiable = "channel 0", True

    def __call__(self, latents, prompts, seed):
        return latents[:, 0].mean(dim=(1, 2))


def held_out_reward(aligner: Aligner) -> float:
    return aligner.evaluate()["eval_reward"]


@pytest.mark.parametrize("method, extra", [("grpo", {"max_steps": 8, "learning_rate": 1e-2}), ("draft", {"max_steps": 4, "learning_rate": 3e-3}),
                                           ("nft", {"max_steps": 6, "learning_rate": 1e-2, "nft": {"kl_coef": 0.0, "updates_per_step": 2}})])
def test_a_few_steps_raise_the_held_out_reward(pipeline_dir, reward_dir, prompt_file, tmp_path, method, extra):
    config = make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / method, method=method, **extra)
    aligner = Aligner(config)
    aligner.rewards = [FirstChannelReward()]
    history = aligner.run()
    before, after = history[0]["eval_reward"], history[-1]["eval_reward"]
    assert after > before + 0.05, (before, after)
    step = history[1]
    for key in ("reward_mean", "reward_std", "clip_fraction", "kl", "time_sampling_s", "time_reward_s", "time_update_s", "peak_memory_mib"):
        assert key in step
    assert (tmp_path / method / "lora" / "lora.safetensors").is_file()
    assert (tmp_path / method / "samples" / f"step_{config.max_steps:06d}.png").is_file()
    assert len((tmp_path / method / "metrics.jsonl").read_text().splitlines()) == config.max_steps + 1


def test_grpo_with_the_latent_dina_reward_and_kl(pipeline_dir, reward_dir, prompt_file, tmp_path):
    """The latent reward path end to end (no decode), with the KL term against the LoRA-free generator."""
    config = make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "kl", max_steps=2, grpo={"kl_coef": 0.1, "updates_per_step": 2})
    history = Aligner(config).run()
    assert all(r["kl"] >= 0.0 for r in history[1:]) and history[-1]["kl"] > 0.0
    assert all(math.isfinite(r["reward_mean"]) for r in history[1:])


def test_resume_continues_exactly(pipeline_dir, reward_dir, prompt_file, tmp_path):
    straight = Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "straight"))
    straight.run()
    first = Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "resumed", max_steps=2))
    first.run()
    resumed = Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "resumed"), resume="latest")
    history = resumed.run()
    # equal up to float rounding: prompts are embedded in batches of different composition
    for key, value in straight.lora_state().items():
        torch.testing.assert_close(resumed.lora_state()[key], value, rtol=1e-5, atol=1e-6)
    assert [r["reward_mean"] for r in history[1:]] == pytest.approx([r["reward_mean"] for r in straight.history[1:]], abs=1e-6)


def test_resume_never_unpickles_and_skips_a_damaged_checkpoint(pipeline_dir, reward_dir, prompt_file, tmp_path):
    run = Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "run"))
    run.run()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002", "step-0000004"]
    assert not [p for p in checkpoints.rglob("*") if p.suffix in (".pt", ".pkl", ".bin")]
    marker = tmp_path / "pwned"
    (checkpoints / "step-0000004" / "optimizer.pt").write_bytes(pickle.dumps(PlantedPayload(str(marker))))
    with pytest.raises(ValueError, match="optimizer.pt is a pickle file"):
        Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "run"), resume="latest").resume(checkpoints / "step-0000004")
    (checkpoints / "step-0000004" / "optimizer.pt").unlink()
    lora = checkpoints / "step-0000004" / "lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:100])
    with pytest.raises(ValueError, match="lora.safetensors is damaged"):
        Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "run"), resume="latest").resume(checkpoints / "step-0000004")
    resumed = Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "run"), resume="latest")
    resumed.resume("latest")
    assert resumed.step == 2 and not marker.exists()


class PlantedPayload:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_sampled_trajectory_shapes_and_ode_gradients(pipeline_dir):
    pipe = load_pipeline(pipeline_dir)
    policy = policy_for(pipe, 8)
    schedule = policy.schedule(3, (4, 8, 8))
    text = TextConditioning(torch.randn(2, 5, 32), torch.randn(2, 64), torch.zeros(2, 5, 32), torch.zeros(2, 64))
    velocity = lambda x, i: policy.velocity(pipe.transformer, x, float(schedule.sigmas[i]), text, 2.0)  # noqa: E731
    start = initial_noise(2, (4, 8, 8), torch.Generator().manual_seed(0), "cpu")
    trajectory = sample_sde(velocity, schedule, start, 0.7, torch.Generator().manual_seed(0))
    assert trajectory.latents.shape == (4, 2, 4, 8, 8) and trajectory.log_probs.shape == (3, 2)
    weight = next(p for p in pipe.transformer.parameters())
    latents = sample_ode(velocity, schedule, start, grad_last_k=1)
    latents.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


class TestBadConfigs:
    def test_group_size_one(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ValueError, match="group_size must be >= 2"):
            make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, grpo={"group_size": 1})

    def test_no_trainable_parameters(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ValueError, match="no trainable parameters"):
            make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, lora_targets=[])
        config = make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, lora_targets=["no_such_module"])
        with pytest.raises(ValueError, match="no_such_module|no trainable parameters"):
            Aligner(config)

    def test_resolution_must_fit_the_vae_and_patches(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ValueError, match="multiple of 16"):
            Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, resolution=40))
        assert Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, resolution=32)).latent_shape == (4, 4, 4)

    def test_reward_returning_nan(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        aligner = Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path))
        nan = FunctionReward(lambda images, prompts, metadata: (torch.full((len(prompts),), float("nan")), {}), "nan")
        aligner.rewards = [DecodedReward(aligner.pipe.vae, nan)]
        with pytest.raises(ValueError, match="NaN"):
            aligner.train_step()

    def test_draft_needs_a_differentiable_reward(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ValueError, match="not differentiable"):
            make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, method="draft",
                        reward={"kind": "python", "target": "dina_lrm_toyworld.rewards:judge"})

    def test_unknown_keys_kinds_and_missing_files(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ConfigError, match="did you mean 'group_size'"):
            make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, grpo={"group_sise": 4})
        with pytest.raises(ValueError, match="unknown reward kind"):
            make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, reward={"kind": "hps"})
        with pytest.raises(FileNotFoundError, match="prompt file"):
            Aligner(make_config(pipeline_dir, reward_dir, Path(tmp_path / "none.txt"), tmp_path))
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "fresh"), resume="latest").run()


def test_cli_align_with_yaml_and_overrides(pipeline_dir, reward_dir, prompt_file, tmp_path, capsys):
    import yaml

    from dina_lrm.cli import main

    config = make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "cli")
    (tmp_path / "align.yaml").write_text(yaml.safe_dump(asdict(config)))
    code = main(["align", "--config", str(tmp_path / "align.yaml"), "--max-steps", "1", "--set", "learning_rate=1e-3"])
    assert code == 0
    assert "1 steps: validation reward" in capsys.readouterr().out
    assert main(["align", "--config", str(tmp_path / "align.yaml"), "--set", "method=ppo"]) == 2


@pytest.mark.slow
def test_two_processes_split_sampling_and_average_gradients(pipeline_dir, reward_dir, prompt_file, tmp_path):
    """`accelerate launch --num_processes 2` (gloo on CPU): both ranks train, rank 0 writes the outputs."""
    import os
    import subprocess
    import sys

    import yaml

    config = make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "ddp", max_steps=2, checkpoint_every=2)
    (tmp_path / "align.yaml").write_text(yaml.safe_dump(asdict(config)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dina_lrm", "align", "--config", str(tmp_path / "align.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "eval_reward" in lines[-1]
    assert (tmp_path / "ddp" / "checkpoints" / "step-0000002" / "lora.safetensors").is_file()
