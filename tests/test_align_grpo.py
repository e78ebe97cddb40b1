"""Flow-GRPO with flow_grpo's conventions, each against flow_grpo's formulas written out by hand: the
KL's denominator, the CPS log-probability, zero-advantage samples left out of the update, and the
steps trained without a window."""

import math

import pytest
import torch

from dina_lrm.align.advantages import informative_samples
from dina_lrm.align.methods.grpo import GRPOConfig, noisy_steps, trained_steps
from dina_lrm.align.sde import cps_step, gaussian_kl, sde_step


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, 2, 2, generator=generator) for _ in range(3))


@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.9), (0.6, 0.45), (0.2, 0.1)])
def test_the_kl_divides_by_flow_grpos_std_without_the_step(sigma, sigma_next):
    x, v, reference = inputs()
    level, below_one = 0.7, 0.9
    step = sde_step(x, v, sigma, sigma_next, level, below_one, generator=torch.Generator().manual_seed(1))
    reference_step = sde_step(x, reference, sigma, sigma_next, level, below_one, next_sample=step.sample)
    # flow_grpo: std_dev_t = sqrt(sigma / (1 - sigma)) * noise_level (sigma = 1 uses the next sigma), no sqrt(-dt)
    std_dev_t = math.sqrt(sigma / (1 - (below_one if sigma == 1 else sigma))) * level
    theirs = ((step.mean - reference_step.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)
    torch.testing.assert_close(gaussian_kl(step.mean, reference_step.mean, step.kl_std), theirs)
    exact = sde_step(x, v, sigma, sigma_next, level, below_one, next_sample=step.sample, likelihood="gaussian")
    torch.testing.assert_close(gaussian_kl(step.mean, reference_step.mean, exact.kl_std), theirs / (sigma - sigma_next))


def test_the_sde_log_probability_is_the_gaussian_density_in_both_conventions():
    x, v, _ = inputs(1)
    step = sde_step(x, v, 0.6, 0.45, 0.7, 0.9, generator=torch.Generator().manual_seed(2))
    exact = sde_step(x, v, 0.6, 0.45, 0.7, 0.9, next_sample=step.sample, likelihood="gaussian")
    torch.testing.assert_close(step.log_prob, exact.log_prob)


def test_the_cps_log_probability_drops_every_constant():
    x, v, _ = inputs(2)
    sigma, sigma_next, level = 0.6, 0.45, 0.8
    step = cps_step(x, v, sigma, sigma_next, level, generator=torch.Generator().manual_seed(3))
    # flow_grpo's cps: log_prob = -(prev_sample - prev_sample_mean)^2, averaged over all but the batch
    std = sigma_next * math.sin(level * math.pi / 2)
    mean = (x - sigma * v) * (1 - sigma_next) + (x + v * (1 - sigma)) * math.sqrt(sigma_next**2 - std**2)
    torch.testing.assert_close(step.log_prob, -((step.sample - mean) ** 2).mean(dim=(1, 2, 3)))
    exact = cps_step(x, v, sigma, sigma_next, level, next_sample=step.sample, likelihood="gaussian")
    torch.testing.assert_close(exact.log_prob, torch.distributions.Normal(mean, std).log_prob(step.sample).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(step.kl_std, exact.kl_std)  # CPS: the KL divides by the step's std either way
    with pytest.raises(ValueError, match="unknown likelihood convention"):
        cps_step(x, v, sigma, sigma_next, level, likelihood="exact")


def test_zero_advantage_samples_leave_the_batch_as_flow_grpo_drops_them():
    advantages = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    kept = informative_samples(advantages, 2, torch.Generator().manual_seed(0))
    assert kept.tolist() == [4, 5, 6, 7]  # four informative samples: divisible by 2 batches, nothing added back
    kept = informative_samples(advantages, 3, torch.Generator().manual_seed(0))
    # 4 is not a multiple of 3: flow_grpo turns 3 - 4 % 3 = 2 random zero-advantage samples back on
    assert len(kept) == 6 and {4, 5, 6, 7} <= set(kept.tolist())
    assert all(advantages[i] == 0 for i in set(kept.tolist()) - {4, 5, 6, 7})
    assert len(informative_samples(torch.zeros(8), 2, torch.Generator())) == 2  # nothing informative: one per batch


def test_without_a_window_the_first_steps_train_and_the_last_step_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    config = GRPOConfig(timestep_fraction=0.5)
    noisy = noisy_steps(config, 10, generator)
    assert noisy == list(range(9))  # flow_grpo's last step draws no noise
    assert trained_steps(config, noisy, 10) == [0, 1, 2, 3, 4]  # int(0.5 x 10), the first ones, not a random draw
    assert trained_steps(GRPOConfig(timestep_fraction=1.0), noisy, 10) == list(range(9))
    windowed = GRPOConfig(sde_window_size=3, sde_window_range=[0, 5])
    window = noisy_steps(windowed, 10, generator)
    assert len(window) == 3 and window == list(range(window[0], window[0] + 3)) and 0 <= window[0] <= 2
    assert trained_steps(windowed, window, 10) == window
