"""The fast paths keep the scores: half-precision autocast (head in fp32), compiled blocks, SDPA in
every attention, gradient checkpointing in differentiable scoring. Equalities, never timings."""

import json

import pytest
import torch
from helpers import make_latents, randomize_lora, tiny_config

from dina_lrm import DiNaLRM, Scorer
from dina_lrm_toyworld.benchmark import write_toy_benchmark
from dina_lrm_toyworld.demo import SHIPPED_GENERATOR, SHIPPED_REWARD

BF16_TOLERANCE = 0.05  # raw-score units, documented in docs/performance.md (measured: 0.009 here, score std 0.56)


@pytest.fixture(scope="module")
def toy_scorer():
    return Scorer.from_pretrained(SHIPPED_REWARD, SHIPPED_GENERATOR)


def test_bf16_autocast_stays_within_the_documented_tolerance(toy_scorer, tmp_path):
    rows = json.loads(write_toy_benchmark(tmp_path, prompts=4, images_per_prompt=3, seed=1).read_text())
    prompts = [row["prompt"] for row in rows for _ in row["image_path"]]
    images = [str(tmp_path / path) for row in rows for path in row["image_path"]]
    fp32 = toy_scorer.score(prompts, images=images, noise_levels=[0.2, 0.5], seed=0).raw
    seen = []
    hook = toy_scorer.model.reward_head.layer_adapters_visual[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    toy_scorer.model.enable_autocast(torch.bfloat16)
    try:
        bf16 = toy_scorer.score(prompts, images=images, noise_levels=[0.2, 0.5], seed=0).raw
        single = toy_scorer.score(prompts, images=images, u=0.4, seed=0).raw
    finally:
        toy_scorer.model.enable_autocast(None)
        hook.remove()
    assert fp32.std() > 0.3 and (bf16 - fp32).abs().max() < BF16_TOLERANCE and not torch.equal(bf16, fp32)
    assert set(seen) == {torch.float32} and single.dtype == torch.float32  # the head reads fp32 features
    with pytest.raises(ValueError, match="autocast takes torch.bfloat16 or torch.float16"):
        toy_scorer.model.enable_autocast(torch.int8)


@pytest.mark.slow  # torch.compile on CPU: 15 s, and compile rarely changes
def test_compiled_blocks_score_as_eager(pipe, text_inputs):
    model = DiNaLRM(tiny_config(), pipe.transformer).eval()
    randomize_lora(model)
    latents, timesteps = make_latents(), torch.tensor([300.0, 600.0])
    with torch.no_grad():
        eager = model(latents, *text_inputs, timesteps)
        model.compile_blocks(dynamic=False)
        compiled = model(latents, *text_inputs, timesteps)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert all(block._compiled_call_impl is not None for block in model.base_backbone.transformer_blocks)


def test_every_attention_goes_through_sdpa(pipe, text_inputs, monkeypatch):
    model = DiNaLRM(tiny_config(), pipe.transformer).eval()
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        model(make_latents(), *text_inputs, torch.tensor([300.0, 600.0]))
    blocks = model.base_backbone.transformer_blocks
    expected = sum(1 + (getattr(b, "attn2", None) is not None) for b in blocks) + 3  # head: visual + text, then visual
    assert len(calls) == expected


def test_gradient_checkpointing_keeps_differentiable_scores_and_gradients(pipe, text_inputs):
    model = DiNaLRM(tiny_config(), pipe.transformer).eval()
    randomize_lora(model)
    results = []
    for checkpointing in (False, True):
        model.enable_gradient_checkpointing(checkpointing)
        latents = make_latents().requires_grad_(True)
        score = model.forward_ensemble(torch.stack([latents, latents * 0.5]), *text_inputs, torch.tensor([300.0, 700.0])).sum()
        score.backward()
        results.append((score.detach(), latents.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


def test_scorer_options_keep_the_scores(toy_scorer, tmp_path):
    from dina_lrm.serve.server import ServeConfig

    rows = json.loads(write_toy_benchmark(tmp_path, prompts=2, images_per_prompt=3, seed=2).read_text())
    images = [str(tmp_path / path) for row in rows for path in row["image_path"]]
    prompts = [row["prompt"] for row in rows for _ in row["image_path"]]
    batched = torch.cat(toy_scorer.encode_images(images))  # same-size images: one VAE pass
    one_by_one = torch.cat([toy_scorer.encode_images([path])[0] for path in images])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
    default = toy_scorer.score(prompts, latents=batched, noise_levels=[0.2, 0.5, 0.8], n_draws=2, seed=0).raw
    toy_scorer.max_batch_items = 100  # every level and draw in one pass
    try:
        one_pass = toy_scorer.score(prompts, latents=batched, noise_levels=[0.2, 0.5, 0.8], n_draws=2, seed=0).raw
    finally:
        toy_scorer.max_batch_items = None
    torch.testing.assert_close(one_pass, default, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown autocast 'int8'"):
        ServeConfig(reward="r", model="m", autocast="int8").validate()
    with pytest.raises(ValueError, match="unknown autocast 'int8'"):
        Scorer.from_pretrained(SHIPPED_REWARD, SHIPPED_GENERATOR, autocast="int8")
