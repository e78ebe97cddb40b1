"""The Qwen-Image backbone on a tiny QwenImageTransformer2DModel: taps equal the stock transformer's
blocks (packing, stock time scaling, text mask, rotary positions), the text conditioning is the
pipeline's own, 4-D and the video VAE's 5-D latents score alike, and the reward model around it."""

import copy

import pytest
import torch
from diffusers import QwenImagePipeline
from safetensors.torch import load_file

from dina_lrm import DiNaConfig, DiNaLRM
from dina_lrm.data.images import vae_decode, vae_encode, vae_scale_factor
from dina_lrm.models.qwenimage import QwenImageBackbone
from dina_lrm.models.qwenimage_text import QwenImagePromptEncoder
from helpers import margin_before_and_after_one_step
from dina_lrm.testing.tiny_qwenimage import build_tiny_qwenimage_pipeline

MODEL = {"backbone_model_id": "Qwen/Qwen-Image", "num_transformer_layers": 3, "visual_head_idx": [1, 3], "text_head_idx": [1, 2],
         "lora_config": {"r": 4, "lora_alpha": 8}, "reward_head": {"num_attn_heads": 2}}
PROMPTS = ["a red circle", "two blue squares on the left of a big green triangle and a small yellow star"]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_qwenimage_pipeline()


@pytest.fixture(scope="module")
def text(pipe):
    return QwenImagePromptEncoder.from_pipeline(pipe, max_sequence_length=512)(PROMPTS)


def latents(batch=2, seed=0):
    return torch.randn(batch, 4, 8, 6, generator=torch.Generator().manual_seed(seed))


def test_prompt_embeddings_are_the_pipelines_own(pipe, text):
    states, mask = text
    reference, reference_mask = pipe.encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=512)
    tokens = reference.shape[1]
    assert states.shape == (2, 512, 32) and mask[:, tokens:].sum() == 0 and mask[0].sum() < mask[1].sum() == tokens
    torch.testing.assert_close(states[:, :tokens], reference, rtol=0, atol=0)
    torch.testing.assert_close(mask[:, :tokens], reference_mask.float(), rtol=0, atol=0)


def test_taps_equal_the_stock_transformers_blocks(pipe, text):
    transformer, (states, mask) = pipe.transformer.eval(), text
    x, timesteps = latents(), torch.tensor([250.0, 700.0])
    tokens = int(mask.sum(1).max())
    captured = {}
    for k, block in enumerate(transformer.transformer_blocks):
        block.register_forward_hook(lambda module, args, out, k=k: captured.__setitem__(k, out))
    with torch.no_grad():
        transformer(hidden_states=QwenImagePipeline._pack_latents(x, 2, 4, 8, 6), encoder_hidden_states=states[:, :tokens],
                    encoder_hidden_states_mask=mask[:, :tokens], timestep=timesteps / 1000, img_shapes=[(1, 4, 3)] * 2)
        out = QwenImageBackbone(transformer, 3, [0, 1, 3], [1, 2])(x, states, mask, timesteps)
    torch.testing.assert_close(out.visual[0], transformer.img_in(QwenImagePipeline._pack_latents(x, 2, 4, 8, 6)))
    torch.testing.assert_close(out.visual[1], captured[0][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.visual[2], captured[2][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text[1], captured[1][0], rtol=1e-5, atol=1e-5)
    assert out.text_mask.shape == (2, tokens) and out.text_mask.sum(1).tolist() == mask.sum(1).tolist()


def test_scores_do_not_depend_on_the_batch_or_the_frame_axis(pipe, text):
    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), copy.deepcopy(pipe.transformer)).eval()
    states, mask = text
    x, timesteps = latents(), torch.tensor([400.0, 400.0])
    with torch.no_grad():
        together = model(x, states, mask, timesteps)
        alone = torch.cat([model(x[i:i + 1], states[i:i + 1], mask[i:i + 1], timesteps[:1]) for i in range(2)])
        video = model(x[:, :, None], states, mask, timesteps)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(video, together, rtol=0, atol=0)


def test_the_video_vae_round_trip_and_its_channel_statistics(pipe):
    vae = pipe.vae
    pixels = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoded = vae_encode(vae, pixels)
        raw = vae.encode(pixels[:, :, None] * 2 - 1).latent_dist.mode()[:, :, 0]
        decoded = vae_decode(vae, encoded)
        reference = ((vae.decode(raw[:, :, None]).sample[:, :, 0] + 1) / 2).clamp(0, 1)
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    assert encoded.shape == (2, 4, 8, 6) and vae_scale_factor(vae) == 4
    torch.testing.assert_close(encoded * std[:, None, None] + mean[:, None, None], raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded, reference, rtol=1e-4, atol=1e-5)


def test_lora_rule_round_trip_and_one_thurstone_step(pipe, text, tmp_path):
    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), copy.deepcopy(pipe.transformer))
    x = latents()
    before, after = margin_before_and_after_one_step(model, x, *text)
    assert after > before
    model.save_pretrained(tmp_path / "rm")
    keys = {k.split(".lora_")[0] for k in load_file(tmp_path / "rm" / "checkpoint" / "backbone_lora" / "adapter_model.safetensors")}
    last_text = {f"base_model.model.transformer_blocks.2.attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
    assert len(keys) == 3 * 8 - 4 and not keys & last_text  # text tapped before the last block: its text stream stays frozen
    loaded = DiNaLRM.from_pretrained(tmp_path / "rm", copy.deepcopy(pipe.transformer))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, *text, torch.tensor([300.0, 300.0])), model.eval()(x, *text, torch.tensor([300.0, 300.0])),
                                   rtol=0, atol=0)


def test_scorer_from_images_through_the_video_vae(pipe):
    from dina_lrm import Scorer

    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL, "data": {"train": {"max_sequence_length": 512}}}), copy.deepcopy(pipe.transformer))
    scorer = Scorer.from_model(model, pipe)
    images = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(1))
    encoded = torch.cat(scorer.encode_images(images))
    by_images = scorer.score(PROMPTS, images=images, u=0.4, seeds=[3, 4]).raw
    torch.testing.assert_close(by_images, scorer.score(PROMPTS, latents=encoded, u=0.4, seeds=[3, 4]).raw)
    grad = encoded.detach().clone().requires_grad_(True)
    scorer.score(PROMPTS, latents=grad, noise_levels=[0.2, 0.6], seed=0, grad=True).raw.sum().backward()
    assert grad.grad is not None and grad.grad.abs().sum() > 0
    same_length = ["a red circle", "a red square"]
    states, mask = pipe.encode_prompt(same_length, device="cpu", max_sequence_length=512)
    assert mask is None  # the pipeline drops a mask that masks nothing
    torch.testing.assert_close(scorer.score(latents=encoded, prompt_embeds=states, u=0.4, seeds=[3, 4]).raw,
                               scorer.score(same_length, latents=encoded, u=0.4, seeds=[3, 4]).raw, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latents have 16 channels but the backbone expects 4"):
        scorer.score(PROMPTS, latents=torch.randn(2, 16, 8, 6), u=0.4, seed=0)


def test_analytic_flops_equal_torch_flop_counter(pipe):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dina_lrm.eval.cost import scoring_flops
    from dina_lrm.rewards import Setting

    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), copy.deepcopy(pipe.transformer)).eval()
    states, mask = torch.randn(1, 40, 32), torch.ones(1, 40)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(latents(batch=1), states, mask, torch.tensor([500.0]))
    assert scoring_flops(model, (4, 8, 6), 40, Setting((0.5,), 1)) == counter.get_total_flops()
