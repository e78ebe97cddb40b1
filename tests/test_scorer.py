import os
import numpy as np
import pytest
import torch
from helpers import make_latents, randomize_lora, tiny_config
from PIL import Image

from dina_lrm import DiNaConfig, DiNaLRM, Scorer
from dina_lrm.noise import add_noise


@pytest.fixture
def reward_dir(pipe, tmp_path):
    model = DiNaLRM(tiny_config(), pipe.transformer)
    randomize_lora(model)
    return model.save_pretrained(tmp_path / "reward")


@pytest.fixture
def scorer(reward_dir, pipeline_dir):
    return Scorer.from_pretrained(reward_dir, pipeline_dir)


def test_scores_are_seeded_and_normalized(scorer):
    latents = make_latents(3)
    a = scorer.score(["a red circle"] * 3, latents=latents, u=0.4, seed=7)
    b = scorer.score("a red circle", latents=latents, u=0.4, seed=7)
    c = scorer.score("a red circle", latents=latents, u=0.4, seed=8)
    assert a.raw.shape == (3,)
    torch.testing.assert_close(a.raw, b.raw)
    assert not torch.allclose(a.raw, c.raw)
    torch.testing.assert_close(a.normalized, (a.raw + 10) / 10)


def test_the_default_noise_level_follows_the_input_kind(scorer):
    """A generator's own latents score at LATENT_U (0.4), images through pixels at IMAGE_U (0.1),
    the same defaults the server, the RL rewards and the CLI use."""
    from dina_lrm.config import IMAGE_U, LATENT_U

    latents = make_latents(2)
    on_latents = scorer.score("a red circle", latents=latents, seed=1)
    assert on_latents.sigmas.tolist() == scorer.sigma_table.snap(torch.tensor([LATENT_U]))[0].tolist()
    torch.testing.assert_close(on_latents.raw, scorer.score("a red circle", latents=latents, u=0.4, seed=1).raw)
    images = torch.rand(2, 3, 64, 64)
    on_images = scorer.score("a red circle", images=images, seed=1)
    assert on_images.sigmas.tolist() == scorer.sigma_table.snap(torch.tensor([IMAGE_U]))[0].tolist()
    torch.testing.assert_close(on_images.raw, scorer.score("a red circle", images=images, u=0.1, seed=1).raw)


def test_score_equals_the_model_on_independently_noised_latents(scorer):
    latents, prompts = make_latents(2), ["a red circle", "a blue square"]
    result = scorer.score(prompts, latents=latents, u=0.4, seed=3)
    noise = torch.randn((1, 1) + tuple(latents.shape), generator=torch.Generator().manual_seed(3))[0, 0]
    sigma, timestep = scorer.sigma_table.snap(torch.tensor(0.4))
    states, pooled = scorer.prompt_encoder(prompts)
    with torch.no_grad():
        expected = scorer.model(add_noise(latents, sigma.expand(2), noise), states, pooled, timestep)[:, 0]
    torch.testing.assert_close(result.raw, expected)


def test_batched_draws_and_levels_equal_the_loop(scorer):
    latents, prompts = make_latents(2), ["a red circle", "a blue square"]
    levels, draws = [0.2, 0.5, 0.8], 2
    result = scorer.score(prompts, latents=latents, noise_levels=levels, n_draws=draws, seed=11)
    noise = torch.randn((draws, len(levels)) + tuple(latents.shape), generator=torch.Generator().manual_seed(11))
    sigmas, timesteps = scorer.sigma_table.snap(torch.tensor(levels))
    states, pooled = scorer.prompt_encoder(prompts)
    per_draw = []
    with torch.no_grad():
        for d in range(draws):
            noisy = torch.stack([add_noise(latents, sigmas[k].expand(2), noise[d, k]) for k in range(3)])
            per_draw.append(scorer.model.forward_ensemble(noisy, states, pooled, timesteps)[:, 0])
    torch.testing.assert_close(result.raw, torch.stack(per_draw).mean(0), rtol=1e-5, atol=1e-6)


def test_images_are_encoded_with_the_vae_and_its_normalisation(scorer, pipe, tmp_path):
    array = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    pixels = torch.from_numpy(array).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        z = pipe.vae.encode(pixels * 2 - 1).latent_dist.mode()
    latents = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    from_file = scorer.score("a cat", images=[path], u=0.1, seed=0)
    from_pil = scorer.score("a cat", images=[Image.fromarray(array)], u=0.1, seed=0)
    from_latents = scorer.score("a cat", latents=latents, u=0.1, seed=0)
    torch.testing.assert_close(from_file.raw, from_latents.raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_pil.raw, from_latents.raw, rtol=1e-5, atol=1e-5)


def test_images_of_different_sizes_are_cropped_and_scored_in_order(scorer):
    images = [torch.rand(3, 64, 64), torch.rand(3, 70, 90), torch.rand(3, 64, 64)]
    mixed = scorer.score(["a", "b", "c"], images=images, seed=0).raw
    alone = scorer.score(["b"], images=[images[1][:, 3:67, 5:85]], seed=0).raw
    assert mixed.shape == (3,)
    assert torch.isfinite(mixed).all() and alone.shape == (1,)


def test_compare_is_the_thurstone_probability_of_paired_scores(scorer):
    import math

    a, b, prompts = make_latents(3, seed=1), make_latents(3, seed=2), ["a red circle", "a blue square", "two stars"]
    p = scorer.compare(prompts, latents=(a, b), u=0.4, seed=5)
    seeds = [5, 6, 7]
    raw_a = scorer.score(prompts, latents=a, u=0.4, seeds=seeds).raw
    raw_b = scorer.score(prompts, latents=b, u=0.4, seeds=seeds).raw
    sigma = float(scorer.sigma_table.snap(torch.tensor(0.4))[0])
    expected = [0.5 * (1 + math.erf((x - y) / math.sqrt(2 * 2 * (2 * sigma**2 + 0.05)) )) for x, y in zip(raw_a.tolist(), raw_b.tolist())]
    assert p.tolist() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(scorer.compare(prompts, latents=(b, a), u=0.4, seed=5), 1 - p)
    assert scorer.compare(prompts, latents=(a, a), u=0.4, seed=5).tolist() == pytest.approx([0.5] * 3)
    with pytest.raises(ValueError, match="images=\\(a, b\\) or latents=\\(a, b\\)"):
        scorer.compare(prompts, latents=(a,))


def test_prompts_are_encoded_with_the_trained_t5_length(pipe, pipeline_dir, tmp_path):
    model = DiNaLRM(DiNaConfig.from_dict({"model": tiny_config().to_dict()["model"], "data": {"train": {"max_sequence_length": 6}}}),
                    pipe.transformer)
    reward = model.save_pretrained(tmp_path / "reward")
    assert Scorer.from_pretrained(reward, pipeline_dir).prompt_encoder.max_sequence_length == 6
    with pytest.warns(UserWarning, match="scoring with 9 T5 tokens, but this reward model was trained with 6"):
        assert Scorer.from_pretrained(reward, pipeline_dir, max_sequence_length=9).prompt_encoder.max_sequence_length == 9


def test_gradients_flow_to_latents_when_asked(scorer):
    latents = make_latents(1).requires_grad_(True)
    scorer.score("a", latents=latents, seed=0, grad=True).raw.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


class TestBadInput:
    def test_prompt_count_mismatch(self, scorer):
        with pytest.raises(ValueError, match="got 3 prompts for 2 images/latents"):
            scorer.score(["a", "b", "c"], latents=make_latents(2))

    def test_missing_and_unreadable_images(self, scorer, tmp_path):
        with pytest.raises(FileNotFoundError, match="image not found"):
            scorer.score("a", images=[tmp_path / "missing.png"])
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not a png")
        with pytest.raises(ValueError, match="cannot read image"):
            scorer.score("a", images=[bad])

    def test_out_of_range_image_tensor(self, scorer):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            scorer.score("a", images=torch.rand(1, 3, 64, 64) * 2 - 1)

    def test_both_or_neither_input(self, scorer):
        with pytest.raises(ValueError, match="exactly one of images= or latents="):
            scorer.score("a")

    def test_wrong_latent_channels_and_nan(self, scorer):
        with pytest.raises(ValueError, match="channels"):
            scorer.score("a", latents=torch.randn(1, 16, 8, 8))
        with pytest.raises(ValueError, match="NaN or inf"):
            scorer.score("a", latents=torch.full((1, 4, 8, 8), float("inf")))

    def test_missing_generator_directory(self, reward_dir, tmp_path):
        with pytest.raises(OSError, match="cannot load the generator pipeline"):
            Scorer.from_pretrained(reward_dir, tmp_path / "no-such-model")


def test_a_scorer_without_text_encoders_loads_none_and_scores_embeddings_as_the_full_one(reward_dir, pipeline_dir, scorer):
    """RL trainers pass the policy's prompt embeddings: the scorer need not load CLIP or T5 at all."""
    lean = Scorer.from_pretrained(reward_dir, pipeline_dir, text_encoders="none")
    assert lean.prompt_encoder is None
    latents, prompts = make_latents(2), ["a red circle", "a blue square"]
    states, pooled = scorer.prompt_encoder(prompts)
    full = scorer.score(prompts, latents=latents, seed=3).raw
    torch.testing.assert_close(lean.score(latents=latents, prompt_embeds=states, pooled_prompt_embeds=pooled, seed=3).raw, full)
    with pytest.raises(ValueError, match="no text encoders.*pass prompt_embeds"):
        lean.score(prompts, latents=latents)
    from dina_lrm.pipelines import load_pipeline
    from dina_lrm.scorer import TEXT_COMPONENTS

    pipe = load_pipeline(pipeline_dir, skip=TEXT_COMPONENTS)
    assert all(getattr(pipe, name) is None for name in TEXT_COMPONENTS) and pipe.vae is not None


def test_a_model_missing_what_the_scorer_calls_is_refused_when_the_scorer_is_built(scorer):
    """The LPO baseline once overrode forward_ensemble without max_batch_items and failed at its first
    score; a Scorer now checks its model's protocol when it is built."""

    class Stale(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        config = property(lambda self: self.model.config)
        base_backbone = property(lambda self: self.model.base_backbone)
        device = property(lambda self: self.model.device)
        dtype = property(lambda self: self.model.dtype)
        check_latents = enable_autocast = compile_blocks = lambda self, *a, **k: None

        def forward_ensemble(self, latents, encoder_hidden_states, pooled_projections, timesteps):
            return self.model.forward_ensemble(latents, encoder_hidden_states, pooled_projections, timesteps)

    with pytest.raises(TypeError, match="forward_ensemble must take max_batch_items"):
        Scorer(Stale(scorer.model), scorer.prompt_encoder, scorer.sigma_table)
    with pytest.raises(TypeError, match=r"Linear is not a latent reward model a Scorer can call: it lacks \['config', 'base_backbone'"):
        Scorer(torch.nn.Linear(2, 2), scorer.prompt_encoder, scorer.sigma_table)


@pytest.mark.parametrize("mode", ["device", "cpu", "none"])
def test_every_loading_mode_scores_as_the_whole_pipeline_and_holds_no_block_past_the_kept_ones(reward_dir, pipeline_dir, mode):
    from dina_lrm.pipelines import load_pipeline

    whole_pipe = load_pipeline(pipeline_dir)
    whole = Scorer.from_pipeline(reward_dir, whole_pipe)
    lean = Scorer.from_pretrained(reward_dir, pipeline_dir, text_encoders=mode)
    latents, prompts = make_latents(2, seed=5), ["a red circle", "two blue squares"]
    states, pooled = whole.prompt_encoder(prompts)
    expected = whole.score(prompts, latents=latents, noise_levels=[0.3, 0.6], seed=3).raw
    text = {"prompt_embeds": states, "pooled_prompt_embeds": pooled} if mode == "none" else {"prompts": prompts}
    torch.testing.assert_close(lean.score(latents=latents, noise_levels=[0.3, 0.6], seed=3, **text).raw, expected, rtol=0, atol=1e-6)
    kept = lean.model.config.model.num_transformer_layers
    assert len(whole_pipe.transformer.transformer_blocks) > kept == len(lean.model.base_backbone.transformer_blocks)
    assert sum(p.numel() for p in lean.model.parameters()) == sum(p.numel() for p in whole.model.parameters())
    assert not any(t.is_meta for t in (*lean.model.parameters(), *lean.model.buffers()))
    assert (lean.prompt_encoder is None) == (mode == "none")


@pytest.mark.slow  # a fresh process; the read-spy test guards the loader in CI
def test_loading_a_reward_allocates_no_tensor_of_a_dropped_block(reward_dir, pipeline_dir):
    """In a fresh process: after loading for embeddings only, every live tensor belongs to the reward
    (the kept modules, LoRA, head), the VAE or the sigma table (views share their base's storage); the
    dropped blocks, norm_out and proj_out were never read."""
    import subprocess
    import sys

    code = f"""
import gc, torch
from dina_lrm import Scorer
from dina_lrm.pipelines import load_pipeline
scorer = Scorer.from_pretrained({str(reward_dir)!r}, {str(pipeline_dir)!r}, text_encoders="none")
gc.collect()
alive = {{id(t): t for t in gc.get_objects() if isinstance(t, torch.Tensor) and not t.is_meta and t.numel() > 64}}
tables = [t for t in vars(scorer.sigma_table).values() if isinstance(t, torch.Tensor)]
owned = {{t.untyped_storage().data_ptr() for m in (scorer.model, scorer.vae) for t in (*m.parameters(), *m.buffers())}}
owned |= {{t.untyped_storage().data_ptr() for t in tables}}
stray = [tuple(t.shape) for t in alive.values() if t.untyped_storage().data_ptr() not in owned]
transformer = load_pipeline({str(pipeline_dir)!r}).transformer
dropped = sum(p.numel() for b in transformer.transformer_blocks[scorer.model.config.model.num_transformer_layers:] for p in b.parameters())
print(stray, file=__import__("sys").stderr)
print(len(stray), sum(t.numel() for t in alive.values()), dropped)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stray, owned, dropped = map(int, out.stdout.split()[-3:])
    assert stray == 0 and owned > 0 and dropped > 0


def test_only_the_kept_tensors_are_read_and_the_whole_transformer_never_loads(reward_dir, pipeline_dir, monkeypatch):
    import dina_lrm.pipelines as pipelines
    import dina_lrm.scorer as scorer_module

    read, skipped = [], []
    real_open, real_load = pipelines.safe_open, scorer_module.load_pipeline

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    def load_pipeline(model, dtype, skip=()):
        skipped.extend(skip)
        return real_load(model, dtype, skip=skip)

    monkeypatch.setattr(pipelines, "safe_open", Spy)
    monkeypatch.setattr(scorer_module, "load_pipeline", load_pipeline)
    scorer = Scorer.from_pretrained(reward_dir, pipeline_dir, text_encoders="none")
    kept = scorer.model.config.model.num_transformer_layers
    assert "transformer" in skipped and "text_encoder_3" in skipped
    assert read and all(name.split(".")[0] in ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks") for name in read)
    assert max(int(name.split(".")[1]) for name in read if name.startswith("transformer_blocks.")) == kept - 1
