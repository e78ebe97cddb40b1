"""ReFL, Flow-GRPO-Fast's window and CPS sampler, the EMA, the shared-weight reward and the hacking
guard, on the tiny SD3 generator."""

import math
from collections import Counter

import pytest
import torch
from helpers import ALIGN_PROMPTS as PROMPTS

from dina_lrm.align.config import AlignConfig
from dina_lrm.align.ema import EMA
from dina_lrm.align.guard import JudgeGuard
from dina_lrm.align.methods.refl import LatentSet, draw_stop_index, flow_matching_loss, predicted_clean
from dina_lrm.align.sampling import initial_noise, sample_sde
from dina_lrm.align.sde import cps_step
from dina_lrm.models.backbones import policy_for
from dina_lrm.models.policy import TextConditioning
from dina_lrm.align.trainer import Aligner
from dina_lrm.data.shards import PairRecord, write_preference_shards
from dina_lrm.noise import SigmaTable
from dina_lrm.pipelines import load_pipeline
from dina_lrm_toyworld.alignment import in_workers, run_one


def refl_config(pipeline_dir, reward_dir, prompt_file, out, **overrides) -> AlignConfig:
    raw = dict(method="refl", generator=str(pipeline_dir), reward={"kind": "dina", "path": str(reward_dir)}, prompts=str(prompt_file),
               num_eval_prompts=4, out=str(out), max_steps=4, prompts_per_step=2, train_sampling_steps=8, refl={"stop_range": [4, 8]},
               eval_sampling_steps=4, guidance_scale=2.0, eval_every=100, checkpoint_every=2, max_sequence_length=8,
               lora_rank=4, learning_rate=3e-3)
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return AlignConfig.from_dict(raw)


class FirstChannelReward:
    name, differentiable, details = "channel 0", True, {}

    def __call__(self, latents, prompts, seed):
        return latents[:, 0].mean(dim=(1, 2))


def test_stop_index_is_uniform_over_the_window():
    generator = torch.Generator().manual_seed(0)
    counts = Counter(draw_stop_index((30, 40), generator) for _ in range(5000))
    assert set(counts) == set(range(30, 40))
    assert all(abs(c / 5000 - 0.1) < 0.02 for c in counts.values())
    config = AlignConfig(method="refl", generator="g", prompts="p")
    assert config.sampling_steps == 40 and config.refl.stop_window(config.sampling_steps) == (30, 40)  # the released recipe


def test_predicted_clean_inverts_the_rectified_flow_noising():
    x0, eps, sigma = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), 0.37
    x_sigma = (1 - sigma) * x0 + sigma * eps
    torch.testing.assert_close(predicted_clean(x_sigma, eps - x0, sigma), x0)


def test_cps_step_by_hand_keeps_the_noise_level_and_zero_noise_is_euler():
    generator = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    sigma, sigma_next, level = 0.6, 0.45, 0.8
    step = cps_step(x, v, sigma, sigma_next, level, generator=generator, likelihood="gaussian")
    std = sigma_next * math.sin(level * math.pi / 2)
    mean = (1 - sigma_next) * (x - sigma * v) + math.sqrt(sigma_next**2 - std**2) * (x + (1 - sigma) * v)
    torch.testing.assert_close(step.mean, mean)
    expected = torch.distributions.Normal(mean, std).log_prob(step.sample).flatten(1).mean(dim=1)
    torch.testing.assert_close(step.log_prob, expected)
    # x0 and eps coefficients: (1 - sigma') and, in quadrature with the fresh noise, sigma'
    assert (math.sqrt(sigma_next**2 - std**2) ** 2 + std**2) == pytest.approx(sigma_next**2)
    torch.testing.assert_close(cps_step(x, v, sigma, sigma_next, 0.0).sample, x + v * (sigma_next - sigma))
    assert cps_step(x, v, sigma, 0.0, level).log_prob is None  # the last step has no noise to add


def test_window_sde_draws_noise_and_log_probs_only_inside_the_window(pipeline_dir):
    pipe = load_pipeline(pipeline_dir)
    policy = policy_for(pipe, 8)
    schedule = policy.schedule(6, (4, 8, 8))
    text = TextConditioning(torch.randn(2, 5, 32), torch.randn(2, 64), torch.zeros(2, 5, 32), torch.zeros(2, 64))
    velocity = lambda x, i: policy.velocity(pipe.transformer, x, float(schedule.sigmas[i]), text, 2.0)  # noqa: E731
    start = initial_noise(2, (4, 8, 8), torch.Generator().manual_seed(0), "cpu")
    trajectory = sample_sde(velocity, schedule, start, 0.7, torch.Generator().manual_seed(0), noisy_steps=[2, 3])
    assert trajectory.noisy_steps == [2, 3]
    assert torch.isnan(trajectory.log_probs[[0, 1, 4, 5]]).all() and torch.isfinite(trajectory.log_probs[[2, 3]]).all()
    for i in range(6):  # outside the window each step is Euler; inside, the log-probability is the Gaussian's by hand
        x, following = trajectory.latents[i], trajectory.latents[i + 1]
        v = velocity(x, i)
        sigma, sigma_next = float(schedule.sigmas[i]), float(schedule.sigmas[i + 1])
        if i not in (2, 3):
            torch.testing.assert_close(following, x + v * (sigma_next - sigma))
            continue
        std_t = 0.7 * math.sqrt(sigma / (1 - sigma))
        mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * (sigma_next - sigma)
        expected = torch.distributions.Normal(mean, std_t * math.sqrt(sigma - sigma_next)).log_prob(following).flatten(1).mean(dim=1)
        torch.testing.assert_close(trajectory.log_probs[i], expected, rtol=1e-4, atol=1e-4)


def test_ema_by_hand():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([weight], decay=0.9, every=2)
    history = [torch.tensor([1.0, 2.0])]
    for step, value in enumerate([[3.0, 2.0], [5.0, 0.0], [7.0, 4.0], [9.0, 4.0]], start=1):
        weight.data = torch.tensor(value)
        ema.update(step)
        if step % 2 == 0:
            history.append(0.9 * history[-1] + 0.1 * torch.tensor(value))
    torch.testing.assert_close(ema.shadow_params[0], history[-1])  # 0.9 (0.9 w0 + 0.1 w2) + 0.1 w4
    with ema.applied():
        torch.testing.assert_close(weight.data, history[-1])
    torch.testing.assert_close(weight.data, torch.tensor([9.0, 4.0]))


def test_guard_keeps_the_best_judge_and_names_the_divergence():
    guard = JudgeGuard(patience=2, tolerance=0.01)
    for step, reward, judge in [(0, 1.0, 0.60), (10, 1.2, 0.70), (20, 1.5, 0.69), (30, 1.9, 0.62), (40, 2.3, 0.40)]:
        guard.observe(step, reward, judge)
    assert guard.best.step == 10
    assert guard.divergence_step() == 30  # 20 is within the tolerance
    assert guard.should_stop
    rebuilt = JudgeGuard.from_history([{"step": 0, "eval_reward": 1.0, "eval_judge": 0.6}, {"step": 5, "reward_mean": 3.0}])
    assert rebuilt.best.step == 0 and not rebuilt.should_stop and rebuilt.divergence_step() is None


def test_refl_gradient_reaches_only_the_policy_lora(pipeline_dir, reward_dir, prompt_file, tmp_path):
    aligner = Aligner(refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path))
    aligner.optimizer.step = lambda: None  # keep the gradients to look at them
    aligner.train_step()
    with_grad = {name for name, p in aligner.pipe.transformer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in name for name in with_grad)
    reward_model = aligner.reward.scorer.model
    assert all(p.grad is None for p in reward_model.parameters())
    assert all(p.grad is None for encoder in (aligner.pipe.text_encoder, aligner.pipe.vae) for p in encoder.parameters())


def test_the_shared_reward_uses_the_policys_weights_and_training_never_changes_its_scores(pipeline_dir, reward_dir, prompt_file, tmp_path):
    aligner = Aligner(refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path, max_steps=3, learning_rate=1e-2))
    reward = aligner.reward
    backbone = reward.scorer.model.base_backbone
    policy_block = aligner.pipe.transformer.transformer_blocks[0].attn.to_q
    assert backbone.transformer_blocks[0].attn.to_q.base_layer.weight is policy_block.base_layer.weight  # one copy in memory
    assert "default" in policy_block.lora_A and backbone.transformer_blocks[0].attn.to_q is not policy_block
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    before = reward(latents, PROMPTS, seed=7)
    lora_before = {k: v.clone() for k, v in aligner.lora_state().items()}
    aligner.run()
    assert any(not torch.equal(v, lora_before[k]) for k, v in aligner.lora_state().items())  # the policy did train
    torch.testing.assert_close(reward(latents, PROMPTS, seed=7), before, rtol=0, atol=0)


def test_one_refl_step_raises_the_reward(pipeline_dir, reward_dir, prompt_file, tmp_path):
    config = refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path, max_steps=1, learning_rate=3e-2, eval_sampling_steps=8)
    aligner = Aligner(config)
    aligner.rewards = [FirstChannelReward()]
    history = aligner.run()
    assert history[-1]["eval_reward"] > history[0]["eval_reward"] + 0.02, (history[0]["eval_reward"], history[-1]["eval_reward"])
    assert 4 <= history[1]["stop_index"] < 8


def test_refl_resume_equals_an_uninterrupted_run(pipeline_dir, reward_dir, prompt_file, tmp_path):
    options = dict(ema_decay=0.5, refl={"kl_coef": 0.1})
    straight = Aligner(refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "straight", **options))
    straight.run()
    Aligner(refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "resumed", max_steps=2, **options)).run()
    resumed = Aligner(refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "resumed", **options), resume="latest")
    history = resumed.run()
    for key, value in straight.lora_state().items():
        torch.testing.assert_close(resumed.lora_state()[key], value, rtol=1e-5, atol=1e-6)
    for average, expected in zip(resumed.ema.shadow_params, straight.ema.shadow_params):
        torch.testing.assert_close(average, expected, rtol=1e-5, atol=1e-6)
    assert [r["reward_mean"] for r in history[1:]] == pytest.approx([r["reward_mean"] for r in straight.history[1:]], abs=1e-5)
    assert [r["stop_index"] for r in history[1:]] == [r["stop_index"] for r in straight.history[1:]]


def write_latent_shards(directory, count=6):
    generator = torch.Generator().manual_seed(0)
    records = [PairRecord(prompt=PROMPTS[i % 4], chosen=torch.randn(4, 8, 8, generator=generator).numpy(),
                          rejected=torch.randn(4, 8, 8, generator=generator).numpy(), pair_id=str(i), group_id=str(i % 4))
               for i in range(count)]
    write_preference_shards(directory, records)
    return directory


def test_flow_matching_loss_on_the_chosen_latents(pipeline_dir, tmp_path):
    latent_set = LatentSet.from_shards(write_latent_shards(tmp_path / "shards"))
    assert len(latent_set.latents) == 6 and latent_set.prompts[:2] == PROMPTS[:2]
    pipe = load_pipeline(pipeline_dir)
    latents, prompts = latent_set.batch(3, torch.Generator().manual_seed(0))
    states, pooled = torch.randn(3, 5, 32), torch.randn(3, 64)
    table = SigmaTable.from_scheduler(pipe.scheduler)
    policy = policy_for(pipe, 8)
    text = TextConditioning(states, pooled, states, pooled)
    loss = flow_matching_loss(lambda noisy, sigmas: policy.velocity(pipe.transformer, noisy, sigmas, text, 1.0), latents, table,
                              torch.Generator().manual_seed(1))
    # the same draws by hand
    generator = torch.Generator().manual_seed(1)
    index = torch.randint(len(table.sigmas), (3,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    sigma = table.sigmas[index].view(-1, 1, 1, 1)
    prediction = pipe.transformer(hidden_states=(1 - sigma) * latents + sigma * noise, encoder_hidden_states=states,
                                  pooled_projections=pooled, timestep=table.timesteps[index]).sample
    torch.testing.assert_close(loss, (prediction - (noise - latents)).pow(2).mean())


def test_refl_with_the_pretrain_loss_and_a_guard(pipeline_dir, reward_dir, prompt_file, tmp_path):
    shards = write_latent_shards(tmp_path / "shards")
    config = refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "run", max_steps=2, eval_every=1,
                         refl={"pretrain_data": str(shards), "pretrain_weight": 1.0}, judge={"kind": "dina", "path": str(reward_dir), "u": 0.2}, test_prompts=str(prompt_file),
                         num_test_prompts=3)
    aligner = Aligner(config)
    history = aligner.run()
    assert all(r["pretrain_loss"] > 0 for r in history[1:])
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best"]["step"] in (0, 1, 2) and set(summary["test"]) == {"base", "final", "best"}
    assert len(summary["test"]["base"]["judge"]) == 3 and summary["test_prompts"] == PROMPTS[:3]
    assert (tmp_path / "run" / "best" / "lora.safetensors").is_file()


class TestBadReflConfigs:
    def test_stop_window_outside_the_schedule(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ValueError, match=r"refl.stop_range \[6, 10\) lies outside the 8-step schedule"):
            refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path, refl={"stop_range": [6, 10]})

    def test_non_differentiable_reward(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ValueError, match="not differentiable"):
            refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path, reward={"kind": "python", "target": "dina_lrm_toyworld.rewards:judge"})

    def test_rewards_that_all_weigh_nothing_or_less(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ValueError, match="at least one reward with a non-zero weight"):
            refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path, reward={"kind": "dina", "path": str(reward_dir), "weight": 0.0})
        with pytest.raises(ValueError, match="weight must be >= 0"):
            refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path, reward={"kind": "dina", "path": str(reward_dir), "weight": -1.0})

    def test_pretrain_loss_without_data(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ValueError, match="pretrain_weight > 0 needs refl.pretrain_data"):
            refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path, refl={"pretrain_weight": 0.5})
        with pytest.raises(FileNotFoundError, match="pretrain data not found"):
            Aligner(refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path, refl={"pretrain_weight": 0.5, "pretrain_data": str(tmp_path / "none")}))

    def test_window_that_does_not_fit(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ValueError, match="SDE window of 3 steps does not fit"):
            refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path, method="grpo", grpo={"sde_window_size": 3, "sde_window_range": [0, 2]})


@pytest.mark.slow
def test_runs_spread_over_worker_processes_equal_runs_in_this_process(pipeline_dir, reward_dir, prompt_file, tmp_path):
    calls = lambda where: [(refl_config(pipeline_dir, reward_dir, prompt_file, tmp_path / where / str(seed), max_steps=2, seed=seed),)
                           for seed in (0, 1)]
    spread, here = in_workers(run_one, calls("spread"), workers=2), in_workers(run_one, calls("here"), workers=1)
    for (spread_history, spread_summary), (history, summary) in zip(spread, here):
        assert [r["reward_mean"] for r in spread_history[1:]] == pytest.approx([r["reward_mean"] for r in history[1:]], abs=1e-4)
        assert spread_summary["steps"] == summary["steps"] == 2
    assert here[0][0][1]["reward_mean"] != here[1][0][1]["reward_mean"]  # the seeds differ
