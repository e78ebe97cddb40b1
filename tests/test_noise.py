import torch

from dina_lrm.noise import NoiseSampler, SigmaTable, add_noise


def test_sigma_table_is_the_shifted_flow_matching_table():
    table = SigmaTable.from_shift(3.0)
    s = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    expected = 3.0 * s / (1 + 2.0 * s)
    assert len(table.sigmas) == 1000
    torch.testing.assert_close(table.sigmas.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(table.timesteps.double(), expected * 1000, atol=1e-3, rtol=0)


def test_snap_picks_the_nearest_entry_and_its_timestep():
    table = SigmaTable.from_shift(3.0)
    u = torch.tensor([0.0, 0.1, 0.4, 0.77, 1.0])
    sigma, timestep = table.snap(u)
    for target, got, t in zip(u, sigma, timestep):
        index = (table.sigmas - target).abs().argmin()
        assert got == table.sigmas[index] and t == table.timesteps[index]
    assert (sigma - u).abs().max() < 0.004


def test_snap_rejects_levels_outside_unit_interval():
    import pytest

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SigmaTable.from_shift(3.0).snap(torch.tensor([1.5]))


def test_add_noise_is_rectified_flow_interpolation():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    out = add_noise(x0, sigma, eps)
    torch.testing.assert_close(out[0], x0[0])
    torch.testing.assert_close(out[1], 0.5 * x0[1] + 0.5 * eps[1])
    torch.testing.assert_close(out[2], eps[2])


def test_samplers_are_seeded_and_have_their_known_moments():
    n = 200_000

    def draw(sampler, seed=0):
        return sampler.sample(n, torch.Generator().manual_seed(seed))

    for scheme in ("uniform", "logit_normal", "mode", "beta", "power"):
        a, b = draw(NoiseSampler(scheme)), draw(NoiseSampler(scheme))
        assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1, scheme
    assert abs(draw(NoiseSampler("uniform")).mean() - 0.5) < 0.005
    assert abs(draw(NoiseSampler("power", power=3.0)).mean() - 1 / 4) < 0.005  # E[U^p] = 1/(p+1)
    assert abs(draw(NoiseSampler("beta", beta_a=2.0, beta_b=6.0)).mean() - 0.25) < 0.005  # a/(a+b)
    median = draw(NoiseSampler("logit_normal", logit_mean=-1.0)).median()
    assert abs(median - torch.sigmoid(torch.tensor(-1.0))) < 0.005
    assert torch.equal(NoiseSampler("constant", value=0.3).sample(4), torch.full((4,), 0.3))
    assert NoiseSampler.from_release("constant", 0.7).value == 0.7
