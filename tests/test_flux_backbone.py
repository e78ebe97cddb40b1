"""The FLUX backbone on a tiny FluxTransformer2DModel: packing and ids as diffusers' own pipeline
makes them, the unscaled time embedding, taps equal to the stock transformer's blocks, and the
reward model around it (LoRA identity, release-layout round trip, bad input)."""

import copy

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

from dina_lrm import DiNaConfig, DiNaLRM
from dina_lrm.models.flux import FluxBackbone, image_ids, pack_latents
from dina_lrm.models.flux_text import FluxPromptEncoder
from helpers import margin_before_and_after_one_step
from dina_lrm.testing.tiny_flux import TINY_FLUX, build_tiny_flux_pipeline

MODEL = {"backbone_model_id": "black-forest-labs/FLUX.1-dev", "num_transformer_layers": 3, "visual_head_idx": [1, 3],
         "text_head_idx": [1, 3], "lora_config": {"r": 4, "lora_alpha": 8}, "reward_head": {"num_attn_heads": 2}}


@pytest.fixture
def transformer():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY_FLUX).eval()


def inputs(batch=2, size=8, tokens=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=generator), torch.randn(batch, tokens, 32, generator=generator),
            torch.randn(batch, 24, generator=generator), torch.tensor([250.0, 700.0][:batch]))


def test_packing_and_ids_are_diffusers_own():
    latents = torch.randn(2, 4, 8, 6)
    torch.testing.assert_close(pack_latents(latents), FluxPipeline._pack_latents(latents, 2, 4, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(image_ids(4, 3), FluxPipeline._prepare_latent_image_ids(1, 4, 3, "cpu", torch.float32), rtol=0, atol=0)


def test_the_time_embedding_reads_sigma_and_guidance_unscaled(transformer):
    backbone = FluxBackbone(transformer, 3, [3], [3])
    pooled = torch.randn(2, 24)
    temb = backbone.time_embedding(torch.tensor([500.0, 900.0]), pooled)
    unscaled = transformer.time_text_embed(torch.tensor([0.5, 0.9]), torch.tensor([3.5, 3.5]), pooled)
    scaled = transformer.time_text_embed(torch.tensor([500.0, 900.0]), torch.tensor([3500.0, 3500.0]), pooled)
    torch.testing.assert_close(temb, unscaled, rtol=0, atol=0)
    assert not torch.allclose(temb, scaled)  # fails if the 1000x scaling of the stock forward creeps in


def test_taps_equal_the_stock_transformers_blocks(transformer):
    latents, context, pooled, timesteps = inputs()
    captured = {}
    for k, block in enumerate(transformer.transformer_blocks):
        block.register_forward_hook(lambda module, args, out, k=k: captured.__setitem__(k, out))
    with torch.no_grad():  # the stock forward scales by 1000 inside, so it gets sigma / 1000 and guidance / 1000
        transformer(hidden_states=pack_latents(latents), encoder_hidden_states=context, pooled_projections=pooled,
                    timestep=timesteps / 1000 / 1000, guidance=torch.full((2,), 3.5 / 1000), img_ids=image_ids(4, 4),
                    txt_ids=torch.zeros(5, 3))
        out = FluxBackbone(transformer, 3, [0, 1, 3], [1, 3])(latents, context, pooled, timesteps)
    torch.testing.assert_close(out.visual[0], transformer.x_embedder(pack_latents(latents)))
    torch.testing.assert_close(out.visual[1], captured[0][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.visual[2], captured[2][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text[1], captured[2][0], rtol=1e-5, atol=1e-5)


def test_reward_model_lora_identity_and_release_layout_round_trip(transformer, tmp_path):
    config = DiNaConfig.from_dict({"model": MODEL})
    model = DiNaLRM(config, copy.deepcopy(transformer)).eval()
    frozen = DiNaLRM(DiNaConfig.from_dict({"model": {**MODEL, "use_lora": False, "freeze_backbone": True}}), copy.deepcopy(transformer)).eval()
    frozen.reward_head.load_state_dict(model.reward_head.state_dict())
    args = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(*args), frozen(*args), rtol=0, atol=0)  # LoRA B starts at zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
        expected = model(*args)
    assert any("transformer_blocks.0.attn.to_q.lora_A" in name for name, _ in model.named_parameters())  # the release's rule
    model.save_pretrained(tmp_path / "rm")
    (tmp_path / "rm" / "checkpoint" / "rm_head.safetensors").unlink()  # the authors' layout: rm_head.pt only, no manifest
    (tmp_path / "rm" / "manifest.json").unlink()
    loaded = DiNaLRM.from_pretrained(tmp_path / "rm", copy.deepcopy(transformer))
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), expected, rtol=0, atol=0)
    assert loaded.config.model.backbone == ""  and loaded.base_backbone.latent_channels == 4


class TestBadInput:
    def test_an_unsupported_transformer_lists_the_supported(self):
        with pytest.raises(ValueError, match="no backbone for a Linear; supported transformers: SD3Transformer2DModel .*FluxTransformer2DModel"):
            DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), torch.nn.Linear(2, 2))

    def test_config_and_transformer_must_agree(self, transformer):
        with pytest.raises(ValueError, match="names backbone 'sd3' but the transformer is a FluxTransformer2DModel"):
            DiNaLRM(DiNaConfig.from_dict({"model": {**MODEL, "backbone": "sd3"}}), transformer)
        sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                    joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24, out_channels=4)
        with pytest.raises(ValueError, match="'black-forest-labs/FLUX.1-dev' is a flux generator, but the transformer is a SD3Transformer2DModel"):
            DiNaLRM(DiNaConfig.from_dict({"model": {**MODEL, "num_transformer_layers": 2, "visual_head_idx": [1], "text_head_idx": [1]}}), sd3)

    def test_wrong_latents_and_taps(self, transformer):
        model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), transformer)
        latents, context, pooled, timesteps = inputs()
        with pytest.raises(ValueError, match="latents have 16 channels but the backbone expects 4"):
            model(torch.randn(2, 16, 8, 8), context, pooled, timesteps)
        with pytest.raises(ValueError, match="not divisible by the patch size 2"):
            model(torch.randn(2, 4, 7, 8), context, pooled, timesteps)
        with pytest.raises(ValueError, match="must be \\(B, C, H, W\\)"):
            model(pack_latents(latents), context, pooled, timesteps)
        with pytest.raises(ValueError, match="has only 3 double-stream blocks"):
            FluxBackbone(FluxTransformer2DModel(**TINY_FLUX), 4, [4], [4])


def test_prompt_embeddings_are_flux_pipelines_own():
    pipe = build_tiny_flux_pipeline()
    prompts = ["a red circle", "two blue squares on the left"]
    states, pooled = FluxPromptEncoder.from_pipeline(pipe, max_sequence_length=16)(prompts)
    ref_states, ref_pooled, text_ids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
    assert states.shape == (2, 16, 32) and pooled.shape == (2, 24) and not text_ids.any()
    torch.testing.assert_close(states, ref_states, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)


def test_scorer_serves_flux_from_images_and_latents(tmp_path):
    from dina_lrm import Scorer
    from dina_lrm.noise import add_noise
    from dina_lrm.serve.server import RewardService, ServeConfig

    pipe = build_tiny_flux_pipeline()
    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL, "data": {"train": {"max_sequence_length": 16}}}), pipe.transformer)
    scorer = Scorer.from_model(model, pipe)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    latents = torch.cat(scorer.encode_images(images))
    assert latents.shape == (2, 4, 8, 8)
    by_images = scorer.score(["a red circle", "a blue square"], images=images, u=0.4, seeds=[3, 4]).raw
    by_latents = scorer.score(["a red circle", "a blue square"], latents=latents, u=0.4, seeds=[3, 4]).raw
    torch.testing.assert_close(by_images, by_latents)
    sigma, timestep = scorer.sigma_table.snap(torch.tensor(0.4))
    noise = torch.stack([torch.randn((1, 1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))[0, 0] for seed in (3, 4)])
    states, pooled = FluxPromptEncoder.from_pipeline(pipe, max_sequence_length=16)(["a red circle", "a blue square"])
    with torch.no_grad():
        direct = model(add_noise(latents, sigma.expand(2), noise), states, pooled, timestep.expand(2))[:, 0]
    torch.testing.assert_close(by_latents, direct, rtol=1e-5, atol=1e-5)
    ensemble = scorer.score(["a red circle"] * 2, latents=latents, noise_levels=[0.2, 0.6], seed=0).raw
    assert torch.isfinite(ensemble).all()
    grad = latents.detach().clone().requires_grad_(True)
    scorer.score(["a red circle"] * 2, latents=grad, u=0.4, seed=0, grad=True).raw.sum().backward()
    assert grad.grad is not None and grad.grad.abs().sum() > 0
    service = RewardService(scorer, ServeConfig(reward="r", model="m"))
    try:
        meta = service.metadata()
        assert meta["backbone"] == "flux" and meta["inputs"]["latent_channels"] == 4 and meta["inputs"]["prompt_embeds_width"] == 32
    finally:
        service.close()


def test_analytic_flops_equal_torch_flop_counter_for_flux(transformer):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dina_lrm.eval.cost import scoring_flops
    from dina_lrm.rewards import Setting

    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), transformer).eval()
    latents, context, pooled, _ = inputs(batch=1, tokens=5)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(latents, context, pooled, torch.tensor([500.0]))
    assert scoring_flops(model, (4, 8, 8), 5, Setting((0.5,), 1)) == counter.get_total_flops()


def test_one_thurstone_step_raises_the_margin(transformer):
    latents, context, pooled, _ = inputs()
    before, after = margin_before_and_after_one_step(DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), transformer), latents, context, pooled)
    assert after > before
