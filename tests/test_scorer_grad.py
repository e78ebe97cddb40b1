"""Differentiable scoring: gradients from the score to latents and to pixels (through the VAE encoder)."""

import pytest
import torch
from helpers import randomize_lora, tiny_config

from dina_lrm import DiNaLRM, Scorer
from dina_lrm.pipelines import load_pipeline

# diffusers' RMSNorm (SD3's qk-norm) takes its variance in float32 even for float64 inputs, which puts
# ~1e-8 relative noise on every forward pass: a finite-difference step of 1e-4 keeps that well
# below the tolerance (a step of 1e-6 would amplify it to a few percent).
GRADCHECK = dict(eps=1e-4, atol=1e-5, rtol=2e-3)


@pytest.fixture(scope="module")
def scorer64(pipeline_dir):
    pipe = load_pipeline(pipeline_dir).to(dtype=torch.float64)
    model = DiNaLRM(tiny_config(), pipe.transformer)
    randomize_lora(model)
    return Scorer.from_model(model.double(), pipe)


@pytest.fixture(scope="module")
def scorer32(pipeline_dir):
    pipe = load_pipeline(pipeline_dir)
    model = DiNaLRM(tiny_config(), pipe.transformer)
    randomize_lora(model)
    return Scorer.from_model(model, pipe)


@pytest.mark.slow
def test_gradcheck_from_latents_float64(scorer64):
    latents = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def score(z):
        return scorer64.score(["a red circle", "a blue square"], latents=z, u=0.4, seed=0, grad=True).raw

    assert score(latents).dtype == torch.float64
    assert torch.autograd.gradcheck(score, (latents,), **GRADCHECK)


def test_gradcheck_through_levels_and_draws_float64(scorer64):
    latents = torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)

    def score(z):
        return scorer64.score("a red circle", latents=z, noise_levels=[0.2, 0.6], n_draws=2, seed=0, grad=True).raw

    assert torch.autograd.gradcheck(score, (latents,), **GRADCHECK)


def test_gradcheck_from_pixels_through_the_vae_encoder_float64(scorer64):
    pixels = (0.2 + 0.6 * torch.rand(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))).requires_grad_(True)

    def score(x):
        return scorer64.score("a red circle", images=x, u=0.1, seed=0, grad=True).raw

    # fast mode checks the Jacobian along random directions: 768 pixels, each column tiny
    assert torch.autograd.gradcheck(score, (pixels,), **GRADCHECK, fast_mode=True)


def test_pixel_gradient_matches_central_differences_float32(scorer32):
    """The dtype users train in: the directional derivative along a random direction vs. central differences."""
    generator = torch.Generator().manual_seed(3)
    pixels = 0.25 + 0.5 * torch.rand(2, 3, 32, 32, generator=generator)
    direction = torch.randn(pixels.shape, generator=generator)
    direction /= direction.norm()

    def total(x):
        return scorer32.score(["a red circle", "a blue square"], images=x, u=0.1, seed=0, grad=True).raw.sum()

    x = pixels.clone().requires_grad_(True)
    total(x).backward()
    analytic = float((x.grad * direction).sum())
    step = 1e-2
    with torch.no_grad():
        numeric = float(total(pixels + step * direction) - total(pixels - step * direction)) / (2 * step)
    assert abs(analytic) > 1e-4
    assert numeric == pytest.approx(analytic, rel=2e-2, abs=1e-5)


def test_no_graph_without_grad(scorer32):
    latents = torch.randn(1, 4, 8, 8).requires_grad_(True)
    assert not scorer32.score("a", latents=latents, seed=0).raw.requires_grad
