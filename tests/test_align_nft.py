"""DiffusionNFT: the loss by hand, its fixed point, the old policy's decay, one step that learns, the
latent reward without a decode, the DPM-Solver-2 rollouts, and bad configurations."""

import math

import pytest
import torch
from test_align import make_config

from dina_lrm.align.advantages import group_advantages
from dina_lrm.align.ema import EMA
from dina_lrm.align.methods.nft import OLD_DECAYS, adaptive_loss, nft_loss, optimality_probability, training_timesteps
from dina_lrm.align.sampling import DPMSolver2, initial_noise, sample_ode
from dina_lrm.align.trainer import Aligner
from dina_lrm.models.backbones import policy_for
from dina_lrm.pipelines import load_pipeline


def by_hand(velocity, old, noisy, clean, sigmas, r, beta, a_max):
    """The DiffusionNFT objective written out element by element, as its paper states it."""
    total = 0.0
    for i in range(len(noisy)):
        t = float(sigmas[i])
        positive = beta * velocity[i] + (1 - beta) * old[i]
        negative = (1 + beta) * old[i] - beta * velocity[i]
        x_positive, x_negative = noisy[i] - t * positive, noisy[i] - t * negative
        w_positive = max(float((x_positive - clean[i]).abs().mean()), 1e-5)
        w_negative = max(float((x_negative - clean[i]).abs().mean()), 1e-5)
        loss_positive = float(((x_positive - clean[i]) ** 2).mean()) / w_positive
        loss_negative = float(((x_negative - clean[i]) ** 2).mean()) / w_negative
        total += r[i] * loss_positive / beta + (1 - r[i]) * loss_negative / beta
    return a_max * total / len(noisy)


def test_the_loss_equals_the_objective_by_hand():
    generator = torch.Generator().manual_seed(0)
    velocity, old, noisy, clean = (torch.randn(3, 4, 2, 2, generator=generator) for _ in range(4))
    sigmas, r = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([1.0, 0.25, 0.5])
    for beta in (1.0, 0.3):
        loss = nft_loss(velocity, old, noisy, clean, sigmas, r, beta, 5.0)
        assert float(loss) == pytest.approx(by_hand(velocity, old, noisy, clean, sigmas, r.tolist(), beta, 5.0), rel=1e-5)
    # r = 1 keeps only the positive branch, r = 0 only the negative one
    t = sigmas.view(-1, 1, 1, 1)
    positive_only = nft_loss(velocity, old, noisy, clean, sigmas, torch.ones(3), 1.0, 5.0)
    torch.testing.assert_close(positive_only, 5.0 * adaptive_loss(noisy - t * velocity, clean).mean())
    negative_only = nft_loss(velocity, old, noisy, clean, sigmas, torch.zeros(3), 1.0, 5.0)
    torch.testing.assert_close(negative_only, 5.0 * adaptive_loss(noisy - t * (2 * old - velocity), clean).mean())


def test_the_adaptive_weight_has_no_gradient_and_a_floor():
    prediction = torch.tensor([[1.0, -1.0]], requires_grad=True)
    clean = torch.zeros(1, 2)
    adaptive_loss(prediction, clean).sum().backward()
    # d/dx mean(x^2) / w with w = mean|x| = 1 held fixed: 2x / 2
    torch.testing.assert_close(prediction.grad, torch.tensor([[1.0, -1.0]]))
    assert float(adaptive_loss(torch.zeros(1, 2), clean)) == 0.0  # the floor keeps an exact sample finite
    assert float(adaptive_loss(torch.full((1, 2), 1e-7), clean)) == pytest.approx(1e-14 / 1e-5)


def test_advantages_map_to_optimality_probabilities_and_clip():
    advantages = torch.tensor([-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    torch.testing.assert_close(optimality_probability(advantages, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


def test_at_the_old_policy_with_every_r_one_half_the_gradient_is_zero():
    generator = torch.Generator().manual_seed(1)
    old, noisy, clean = (torch.randn(4, 4, 3, 3, generator=generator) for _ in range(3))
    velocity = old.clone().requires_grad_(True)
    for beta in (1.0, 0.1):
        velocity.grad = None
        nft_loss(velocity, old, noisy, clean, torch.rand(4, generator=generator), torch.full((4,), 0.5), beta, 5.0).backward()
        assert velocity.grad.abs().max() == 0  # exactly: Adam would turn rounding noise into full steps
    # with an advantage the gradient is the advantage-weighted flow-matching direction
    velocity.grad = None
    nft_loss(velocity, old, noisy, clean, torch.full((4,), 0.5), torch.tensor([1.0, 0.5, 0.5, 0.5]), 1.0, 5.0).backward()
    assert velocity.grad[0].abs().sum() > 0 and velocity.grad[1:].abs().max() < 1e-6


def test_the_old_policy_decays_by_hand():
    assert [OLD_DECAYS["linear"](s) for s in (0, 1, 100, 500, 900)] == pytest.approx([0.0, 0.001, 0.1, 0.5, 0.5])
    assert [OLD_DECAYS["delayed"](s) for s in (0, 74, 75, 76, 100, 300)] == pytest.approx([0, 0, 0, 0.0075, 0.1875, 0.999])
    assert OLD_DECAYS["none"](1000) == 0.0
    weight = torch.nn.Parameter(torch.tensor([0.0, 4.0]))
    old = EMA([weight], OLD_DECAYS["linear"])
    expected = torch.tensor([0.0, 4.0])
    for step, value in enumerate([[1.0, 2.0], [3.0, 0.0], [5.0, 8.0]], start=1):
        weight.data = torch.tensor(value)
        old.update(step)
        decay = 0.001 * step
        expected = decay * expected + (1 - decay) * torch.tensor(value)
    torch.testing.assert_close(old.shadow_params[0], expected)


def test_training_timesteps_take_a_share_of_the_schedule_per_sample():
    chosen = training_timesteps(5, 10, 0.99, torch.Generator().manual_seed(0))
    assert chosen.shape == (5, 9)  # int(0.99 x 10)
    assert all(len(set(row.tolist())) == 9 and max(row) < 10 for row in chosen)
    assert training_timesteps(2, 10, 0.01, torch.Generator()).shape == (2, 1)


def flow_matching_error(aligner, latent, prompt) -> float:
    """The policy's flow-matching loss on ``latent`` at a fixed set of noise levels and noises."""
    generator = torch.Generator().manual_seed(5)
    sigmas = torch.linspace(0.1, 0.9, 9)
    noise = torch.randn((9, *latent.shape), generator=generator)
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * latent + sigmas.view(-1, 1, 1, 1) * noise
    text = aligner.conditioning([prompt] * 9)
    with torch.no_grad():
        velocity = aligner.adapter.velocity(aligner.policy, noisy, sigmas, text, 1.0)
    return float((velocity - (noise - latent)).pow(2).mean())


def test_one_step_toward_a_preferred_sample_lowers_its_flow_matching_loss(pipeline_dir, reward_dir, prompt_file, tmp_path):
    """Two recorded samples of one prompt, a reward that prefers the first: one NFT update lowers the
    policy's flow-matching loss on the preferred sample and raises it on the other."""
    config = make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, method="nft", learning_rate=1e-2,
                         nft={"group_size": 2, "kl_coef": 0.0, "timestep_fraction": 1.0, "advantage_max": 1.0})
    aligner = Aligner(config)
    prompt = "a red circle"
    text = aligner.conditioning([prompt, prompt])
    with torch.no_grad():
        start = initial_noise(2, aligner.latent_shape, torch.Generator().manual_seed(9), "cpu")
        recorded = sample_ode(aligner.velocity_fn(text, aligner.train_schedule), aligner.train_schedule, start)
    rewards = torch.tensor([1.0, 0.0])  # the reward prefers the first
    optimality = optimality_probability(group_advantages(rewards, 2, clip=1.0), 1.0)
    assert optimality.tolist() == pytest.approx([1.0, 0.0], abs=1e-3)
    before = [flow_matching_error(aligner, latent, prompt) for latent in recorded]
    aligner.method.train(recorded, text, optimality, torch.Generator().manual_seed(0))
    after = [flow_matching_error(aligner, latent, prompt) for latent in recorded]
    assert after[0] < before[0] and after[1] > before[1], (before, after)


def test_a_latent_reward_is_never_decoded(pipeline_dir, reward_dir, prompt_file, tmp_path):
    aligner = Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, method="nft", max_steps=1))
    decodes = []
    aligner.pipe.vae.decoder.register_forward_hook(lambda *args: decodes.append(1))
    stats = aligner.train_step()
    assert decodes == [] and math.isfinite(stats["reward_mean"]) and math.isfinite(stats["loss"])
    assert set(aligner.method.state_dict()) == {f"old.{i}" for i in range(len(aligner.trainable))}


def test_nft_resume_equals_an_uninterrupted_run(pipeline_dir, reward_dir, prompt_file, tmp_path):
    options = dict(method="nft", nft={"old_decay": "delayed", "kl_coef": 0.1})
    straight = Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "straight", **options))
    straight.run()
    Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "resumed", max_steps=2, **options)).run()
    resumed = Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "resumed", **options), resume="latest")
    resumed.run()
    for key, value in straight.lora_state().items():
        torch.testing.assert_close(resumed.lora_state()[key], value, rtol=1e-5, atol=1e-6)
    for key, value in straight.method.state_dict().items():
        torch.testing.assert_close(resumed.method.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_dpm_solver_2_is_second_order_and_exact_on_a_straight_flow(pipeline_dir):
    """On x0 fixed (v = (x - x0) / sigma, a straight path) every solver lands on x0; on a curved field
    DPM-Solver-2 with 8 steps is closer to a 400-step Euler reference than Euler with 8 steps."""
    pipe = load_pipeline(pipeline_dir)
    policy = policy_for(pipe, 8)
    start = initial_noise(2, (4, 8, 8), torch.Generator().manual_seed(0), "cpu")
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    schedule = policy.schedule(8, (4, 8, 8))
    straight = lambda x, i: (x - target) / float(schedule.sigmas[i])  # noqa: E731
    for solver in ("euler", "dpm2"):
        torch.testing.assert_close(sample_ode(straight, schedule, start, solver=solver), target, rtol=1e-4, atol=1e-4)

    def curved(schedule):
        return lambda x, i: (x - torch.tanh(2 * x) * 0.5) / max(float(schedule.sigmas[i]), 1e-3) * 0.8

    fine = policy.schedule(400, (4, 8, 8))
    reference = sample_ode(curved(fine), fine, start)
    euler = (sample_ode(curved(schedule), schedule, start) - reference).abs().mean()
    dpm = (sample_ode(curved(schedule), schedule, start, solver="dpm2") - reference).abs().mean()
    assert dpm < euler, (float(dpm), float(euler))
    assert DPMSolver2(schedule).sigmas.dtype == torch.float64


class TestBadNFTConfigs:
    @pytest.mark.parametrize("section, message", [
        ({"beta": 0.0}, "nft.beta must be > 0"),
        ({"beta": -1.0}, "nft.beta must be > 0"),
        ({"advantage_max": 0.0}, "advantage clip"),
        ({"old_decay": "cosine"}, "unknown nft.old_decay 'cosine'"),
        ({"solver": "heun"}, "unknown nft.solver 'heun'"),
        ({"group_size": 1}, "group_size must be >= 2"),
        ({"timestep_fraction": 0.0}, "timestep_fraction"),
    ])
    def test_refused(self, pipeline_dir, reward_dir, prompt_file, tmp_path, section, message):
        with pytest.raises(ValueError, match=message):
            make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, method="nft", nft=section)

    def test_a_grpo_clip_of_zero(self, pipeline_dir, reward_dir, prompt_file, tmp_path):
        with pytest.raises(ValueError, match="clip_range and grpo.advantage_clip must be > 0"):
            make_config(pipeline_dir, reward_dir, prompt_file, tmp_path, grpo={"clip_range": 0.0})

    def test_a_solver_outside_the_list(self):
        with pytest.raises(ValueError, match="unknown ODE solver 'rk4'"):
            sample_ode(lambda x, i: x, None, torch.zeros(1), solver="rk4")


def brightness(device):
    """A reward that reads latents itself: the mean of latent channel 0."""
    return lambda latents, prompts, metadata: (latents[:, 0].mean(dim=(1, 2)), {})


def test_a_python_reward_reads_latents_and_an_image_only_one_is_refused(pipeline_dir, reward_dir, prompt_file, tmp_path):
    latent_reward = {"kind": "python", "target": "test_align_nft:brightness", "input": "latents", "name": "brightness"}
    aligner = Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "ok", method="nft", reward=latent_reward))
    decodes = []
    aligner.pipe.vae.decoder.register_forward_hook(lambda *args: decodes.append(1))
    latents = torch.randn(2, *aligner.latent_shape)
    torch.testing.assert_close(aligner.reward(latents, ["a", "b"], seed=0), latents[:, 0].mean(dim=(1, 2)))
    assert decodes == []
    judge = {"kind": "python", "target": "dina_lrm_toyworld.rewards:judge", "input": "latents"}
    with pytest.raises(ValueError, match="scores images only and cannot take latents"):
        Aligner(make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "bad", method="nft", reward=judge))
    with pytest.raises(ValueError, match="unknown reward input 'pixels'"):
        make_config(pipeline_dir, reward_dir, prompt_file, tmp_path / "bad", reward={**judge, "input": "pixels"})
