"""The Z-Image backbone on a tiny ZImageTransformer2DModel: the taps equal the stock transformer's
layers (patch order, pad tokens, position ids, image-first sequence, 1 - sigma time), the text
conditioning equals ZImagePipeline's, scores do not depend on the batch a prompt shares, and the
reward model around it (the authors' LoRA keys and config, round trip, Scorer, server, training)."""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import ZImageTransformer2DModel
from safetensors.torch import load_file

from dina_lrm import DiNaConfig, DiNaLRM
from dina_lrm.models.zimage import ZImageBackbone, patchify
from dina_lrm.models.zimage_text import ZImagePromptEncoder
from helpers import margin_before_and_after_one_step
from dina_lrm.testing.tiny_zimage import TINY_ZIMAGE, build_tiny_zimage_pipeline

MODEL = {"backbone_model_id": "Tongyi-MAI/Z-Image-Turbo", "num_transformer_layers": 3, "visual_head_idx": [1, 3], "text_head_idx": [2, 3],
         "lora_config": {"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian"},
         "reward_head": {"use_proj_in": True, "width": 64, "num_attn_heads": 2, "t_emb_dim": 256}}
PROMPTS = ["a red circle", "two blue squares on the left of a big green triangle and a small yellow star"]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_zimage_pipeline()


@pytest.fixture(scope="module")
def text(pipe):
    return ZImagePromptEncoder.from_pipeline(pipe, max_sequence_length=96)(PROMPTS)


def latents(batch=2, seed=0):
    return torch.randn(batch, 4, 8, 6, generator=torch.Generator().manual_seed(seed))


def test_prompt_embeddings_are_zimage_pipelines_own(pipe, text):
    states, mask = text
    reference = pipe._encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=96)
    assert states.shape == (2, 96, 24) and mask.shape == (2, 96)
    assert [int(m.sum()) for m in mask] == [len(r) for r in reference] and len(reference[0]) != len(reference[1])
    for i in range(2):
        torch.testing.assert_close(states[i, mask[i] > 0], reference[i], rtol=0, atol=0)


def test_taps_equal_the_stock_transformers_layers(pipe, text):
    transformer, (states, mask) = pipe.transformer.eval(), text
    x, timesteps = latents(), torch.tensor([250.0, 700.0])
    captured = {}
    for k, layer in enumerate(transformer.layers):
        layer.register_forward_hook(lambda module, args, out, k=k: captured.__setitem__(k, out))
    with torch.no_grad():
        transformer(x=list(x.unsqueeze(2).unbind(0)), t=(1000 - timesteps) / 1000, cap_feats=[states[i, mask[i] > 0] for i in range(2)])
        out = ZImageBackbone(transformer, 3, [1, 3], [2, 3])(x, states, mask, timesteps)
    image_tokens = out.visual[0].shape[1]
    assert image_tokens == 32 and out.temb.shape == (2, 256)  # 4 x 3 patches padded to 32; the 256-wide adaLN input
    assert out.text_mask.sum(1).tolist() == [64, 96]  # each caption (35, 86 tokens) padded to a multiple of 32
    for tap, visual in zip([1, 3], out.visual):
        torch.testing.assert_close(visual, captured[tap - 1][:, :image_tokens], rtol=1e-5, atol=1e-5)
    for tap, caption in zip([2, 3], out.text):
        for i, length in enumerate([64, 96]):
            torch.testing.assert_close(caption[i, :length], captured[tap - 1][i, image_tokens:image_tokens + length], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.temb, transformer.t_embedder((1000 - timesteps) / 1000 * 1000))


def test_patch_features_are_row_column_channel():
    x = torch.arange(2 * 4 * 4).float().view(1, 2, 4, 4)
    assert patchify(x)[0, 0].tolist() == [0, 16, 1, 17, 4, 20, 5, 21]


def test_a_prompt_scores_the_same_alone_and_in_a_batch(pipe, text):
    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), copy.deepcopy(pipe.transformer)).eval()
    states, mask = text
    x, timesteps = latents(), torch.tensor([400.0, 400.0])
    with torch.no_grad():
        together = model(x, states, mask, timesteps)
        alone = torch.cat([model(x[i:i + 1], states[i:i + 1], mask[i:i + 1], timesteps[:1]) for i in range(2)])
        ensemble = model.forward_ensemble(torch.stack([x, x]), states, mask, torch.tensor([300.0, 600.0]))
        ensemble_alone = model.forward_ensemble(torch.stack([x[:1], x[:1]]), states[:1], mask[:1], torch.tensor([300.0, 600.0]))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ensemble[:1], ensemble_alone, rtol=1e-5, atol=1e-5)


def test_authors_lora_keys_and_release_layout_round_trip(pipe, text, tmp_path):
    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), copy.deepcopy(pipe.transformer)).eval()
    frozen = DiNaLRM(DiNaConfig.from_dict({"model": {**MODEL, "use_lora": False, "freeze_backbone": True}}), copy.deepcopy(pipe.transformer)).eval()
    frozen.reward_head.load_state_dict(model.reward_head.state_dict())
    args = (latents(), *text, torch.tensor([250.0, 700.0]))
    with torch.no_grad():
        torch.testing.assert_close(model(*args), frozen(*args), rtol=0, atol=0)  # LoRA B starts at zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
        expected = model(*args)
    model.save_pretrained(tmp_path / "rm")
    keys = set(load_file(tmp_path / "rm" / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"))
    blocks = ["noise_refiner.0", "context_refiner.0", "layers.0", "layers.1", "layers.2"]  # the authors' rule: exclude nothing
    assert keys == {f"base_model.model.{b}.attention.{p}.lora_{ab}.weight" for b in blocks for p in ("to_q", "to_k", "to_v", "to_out.0")
                    for ab in "AB"}
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["model"]["reward_head"]["t_emb_dim"] == 256
    (tmp_path / "rm" / "checkpoint" / "rm_head.safetensors").unlink()  # the authors' layout: rm_head.pt only, no manifest
    (tmp_path / "rm" / "manifest.json").unlink()
    theirs = yaml.safe_load((Path(__file__).parent / "data" / "authors_configs" / "zimage-thurstone-16layer.yaml").read_text())
    theirs["model"].update({k: MODEL[k] for k in ("num_transformer_layers", "visual_head_idx", "text_head_idx", "lora_config")})
    theirs["model"]["reward_head"].update(width=64, num_attn_heads=2)
    (tmp_path / "rm" / "config.json").write_text(json.dumps(theirs))  # config.json = their YAML as JSON (tiny sizes)
    loaded = DiNaLRM.from_pretrained(tmp_path / "rm", copy.deepcopy(pipe.transformer))
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), expected, rtol=0, atol=0)
    assert loaded.backbone_name == "zimage"


def test_one_thurstone_step_raises_the_margin(pipe, text):
    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), copy.deepcopy(pipe.transformer))
    before, after = margin_before_and_after_one_step(model, latents(), *text)
    assert after > before


def test_scorer_and_server_on_zimage(pipe):
    from dina_lrm import Scorer
    from dina_lrm.serve.server import RewardService, ServeConfig

    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL, "data": {"train": {"max_sequence_length": 96}}}), copy.deepcopy(pipe.transformer))
    scorer = Scorer.from_model(model, pipe)
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    encoded = torch.cat(scorer.encode_images(images))
    assert encoded.shape == (2, 4, 8, 6)
    by_images = scorer.score(PROMPTS, images=images, u=0.4, seeds=[3, 4]).raw
    torch.testing.assert_close(by_images, scorer.score(PROMPTS, latents=encoded, u=0.4, seeds=[3, 4]).raw)
    alone = torch.cat([scorer.score(PROMPTS[i], latents=encoded[i:i + 1], u=0.4, seeds=[3 + i]).raw for i in range(2)])
    torch.testing.assert_close(by_images, alone, rtol=1e-5, atol=1e-5)
    grad = encoded.detach().clone().requires_grad_(True)
    scorer.score(PROMPTS, latents=grad, noise_levels=[0.2, 0.6], seed=0, grad=True).raw.sum().backward()
    assert grad.grad is not None and grad.grad.abs().sum() > 0
    service = RewardService(scorer, ServeConfig(reward="r", model="m"))
    try:
        meta = service.metadata()
        assert meta["backbone"] == "zimage" and meta["inputs"]["prompt_embeds_width"] == 24
        assert meta["inputs"]["pooled_prompt_embeds_width"] == "text mask (B, tokens)"
    finally:
        service.close()


class TestBadInput:
    def test_tap_zero_and_taps_beyond_the_kept_layers(self):
        transformer = ZImageTransformer2DModel(**TINY_ZIMAGE)
        with pytest.raises(ValueError, match="no tap 0"):
            ZImageBackbone(transformer, 3, [0, 3], [3])
        with pytest.raises(ValueError, match=r"visual taps \[4\] lie beyond the 3 kept layers"):
            ZImageBackbone(transformer, 3, [4], [3])

    def test_a_pooled_embedding_instead_of_the_mask(self, pipe, text):
        model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), copy.deepcopy(pipe.transformer))
        with pytest.raises(ValueError, match="takes the text mask \\(B, tokens\\) in place of pooled_projections"):
            model(latents(), text[0], torch.randn(2, 24), torch.tensor([400.0, 400.0]))

    def test_a_misstated_time_embedding_width(self, pipe):
        with pytest.raises(ValueError, match="t_emb_dim=128, but the zimage backbone's time embedding is 256 wide"):
            DiNaLRM(DiNaConfig.from_dict({"model": {**MODEL, "reward_head": {**MODEL["reward_head"], "t_emb_dim": 128}}}), pipe.transformer)


def test_analytic_flops_equal_torch_flop_counter(pipe):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dina_lrm.eval.cost import scoring_flops
    from dina_lrm.rewards import Setting

    model = DiNaLRM(DiNaConfig.from_dict({"model": MODEL}), copy.deepcopy(pipe.transformer)).eval()
    states, mask = torch.randn(1, 40, 24), torch.ones(1, 40)  # 40 caption tokens, padded to 64; 4 x 3 patches, padded to 32
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(latents(batch=1), states, mask, torch.tensor([500.0]))
    assert scoring_flops(model, (4, 8, 6), 40, Setting((0.5,), 1)) == counter.get_total_flops()
