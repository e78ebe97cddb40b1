"""Every generator family as a policy: the adapter's Euler samples equal the stock diffusers pipeline's
(packing, ids, timestep scale, sign, guidance, shifted schedule), and one ReFL, GRPO and DiffusionNFT
step and one pruned search run on tiny FLUX, Z-Image and Qwen-Image pipelines with a DiNa-LRM of the
same backbone."""

import copy
import math

import pytest
import torch
from diffusers import DDIMScheduler
from peft import LoraConfig

from dina_lrm.testing.tiny_sd3 import save_tiny_sd3_pipeline
from helpers import ALIGN_PROMPTS, reset_accelerate
from dina_lrm import DiNaConfig, DiNaLRM
from dina_lrm.align.config import AlignConfig
from dina_lrm.align.sampling import initial_noise, sample_ode
from dina_lrm.align.trainer import Aligner
from dina_lrm.models.backbones import policy_for
from dina_lrm.models.flux import pack_latents
from dina_lrm.models.flux_policy import unpack_latents
from dina_lrm.pipelines import load_pipeline
from dina_lrm.search import Searcher, SearchConfig
from dina_lrm.testing.tiny_flux import build_tiny_flux_pipeline
from dina_lrm.testing.tiny_qwenimage import build_tiny_qwenimage_pipeline
from dina_lrm.testing.tiny_zimage import build_tiny_zimage_pipeline

PROMPTS = ["a red circle", "two blue squares"]
REWARD_MODEL = {"num_transformer_layers": 3, "visual_head_idx": [1, 3], "text_head_idx": [1, 3], "lora_config": {"r": 4, "lora_alpha": 8},
                "reward_head": {"num_attn_heads": 2, "width": 64, "use_proj_in": True}}
FAMILIES = {  # name: (pipeline builder, text tokens, guidance scales to compare: (ours, the stock pipeline's keyword arguments))
    "flux": (build_tiny_flux_pipeline, 16, [(3.5, {"guidance_scale": 3.5})]),
    "zimage": (build_tiny_zimage_pipeline, 64, [(0.0, {"guidance_scale": 0.0}), (2.0, {"guidance_scale": 2.0})]),
    "qwenimage": (build_tiny_qwenimage_pipeline, 64, [(1.0, {"true_cfg_scale": 1.0}), (3.0, {"true_cfg_scale": 3.0, "negative_prompt": ""})]),
}


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    return load_pipeline(save_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"), seed=0))


def stock_latents(name, pipe, start, steps, tokens, kwargs):
    """The stock pipeline's final latents from ``start`` (unpacked (B, C, h, w))."""
    side = start.shape[-1] * pipe.vae_scale_factor
    packed = name in ("flux", "qwenimage")
    common = dict(prompt=PROMPTS, height=side, width=side, num_inference_steps=steps, output_type="latent", max_sequence_length=tokens)
    if name == "qwenimage":  # the video VAE's latents carry a frame axis before packing
        out = pipe(latents=pack_latents(start), **common, **kwargs).images
    else:
        out = pipe(latents=pack_latents(start) if packed else start, **common, **kwargs).images
    return unpack_latents(out, *start.shape[-2:]) if packed else out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_euler_samples_equal_the_stock_pipeline(name):
    build, tokens, scales = FAMILIES[name]
    pipe = build()
    policy = policy_for(pipe, tokens)
    shape = policy.latent_shape(32)
    for ours, stock in scales:
        start = initial_noise(2, shape, torch.Generator().manual_seed(0), "cpu")
        schedule = policy.schedule(3, shape)
        text = policy.encode(PROMPTS, "")
        with torch.no_grad():
            mine = sample_ode(lambda x, i: policy.velocity(pipe.transformer, x, float(schedule.sigmas[i]), text, ours), schedule, start)
            theirs = stock_latents(name, pipe, start.clone(), 3, tokens, stock)
        torch.testing.assert_close(mine, theirs.float(), rtol=1e-4, atol=1e-4, msg=f"{name} at guidance {ours}")


def test_sd3_samples_equal_the_stock_pipeline(sd3_pipe):
    policy = policy_for(sd3_pipe, 8)
    shape = policy.latent_shape(32)
    start = initial_noise(2, shape, torch.Generator().manual_seed(0), "cpu")
    schedule = policy.schedule(4, shape)
    text = policy.encode(PROMPTS, "")
    with torch.no_grad():
        mine = sample_ode(lambda x, i: policy.velocity(sd3_pipe.transformer, x, float(schedule.sigmas[i]), text, 3.0), schedule, start)
        theirs = sd3_pipe(prompt=PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=3.0, latents=start.clone(),
                          output_type="latent", max_sequence_length=8).images
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_the_sd3_policy_lora_leaves_the_second_attention_alone(sd3_pipe):
    """flow_grpo's and the authors' recipes list attn.to_q ... attn.to_add_out: SD3.5's attn2 gets no LoRA."""
    policy = policy_for(sd3_pipe, 8)
    assert any(block.attn2 is not None for block in sd3_pipe.transformer.transformer_blocks)
    transformer = copy.deepcopy(sd3_pipe.transformer)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=policy.lora_targets))
    adapted = {name.split(".lora_")[0] for name, _ in transformer.named_parameters() if "lora_" in name}
    assert adapted and not any(".attn2." in name for name in adapted)
    assert {name.rsplit(".", 1)[-1] for name in adapted} >= {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}


def test_a_scheduler_without_flow_matching_is_refused(sd3_pipe):
    pipe = copy.copy(sd3_pipe)
    pipe.scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        policy_for(pipe, 8)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A saved tiny pipeline of the family and a saved DiNa-LRM on its transformer."""
    name = request.param
    build, tokens, _ = FAMILIES[name]
    directory = tmp_path_factory.mktemp(name)
    pipe = build()
    pipe.save_pretrained(str(directory / "pipeline"))
    config = DiNaConfig.from_dict({"model": {**REWARD_MODEL, "backbone_model_id": name}, "data": {"train": {"max_sequence_length": tokens}}})
    reward = DiNaLRM(config, load_pipeline(directory / "pipeline").transformer).save_pretrained(directory / "reward")
    prompts = directory / "prompts.txt"
    prompts.write_text("\n".join(ALIGN_PROMPTS) + "\n")
    return name, directory / "pipeline", reward, prompts, tokens


@pytest.mark.parametrize("method, section", [
    ("refl", {"refl": {"stop_range": [2, 4]}}),
    ("grpo", {"grpo": {"group_size": 2, "sde_window_size": 2, "sde_window_range": [0, 3]}}),
    ("nft", {"nft": {"group_size": 2, "timestep_fraction": 0.5}}),
])
def test_one_step_of_every_method(family, tmp_path, method, section):
    name, pipeline_dir, reward_dir, prompts, tokens = family
    reset_accelerate()
    config = AlignConfig.from_dict({"method": method, "generator": str(pipeline_dir), "reward": {"kind": "dina", "path": str(reward_dir)},
                                    "prompts": str(prompts), "out": str(tmp_path / "out"), "max_steps": 1, "prompts_per_step": 2,
                                    "train_sampling_steps": 4, "eval_sampling_steps": 2, "resolution": 32, "lora_rank": 2, "lora_alpha": 4,
                                    "max_sequence_length": tokens, "num_eval_prompts": 2, **section})
    aligner = Aligner(config)
    before = {k: v.clone() for k, v in aligner.lora_state().items()}
    stats = aligner.train_step()
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["reward_mean"])
    assert any(not torch.equal(v, before[k]) for k, v in aligner.lora_state().items()), f"{method} on {name} did not update the LoRA"
    assert aligner.reward.scorer.model.backbone_name == name


def test_a_pruned_search(family):
    name, pipeline_dir, reward_dir, _, tokens = family
    pipe = load_pipeline(pipeline_dir)
    config = SearchConfig(strategy="prune", n=4, keep=2, at=[0.6], steps=4, resolution=32, max_sequence_length=tokens)
    searcher = Searcher.from_pretrained(reward_dir, pipe, config)
    result = searcher.run("a red circle", seed=0)
    assert result.latents.shape == searcher.latent_shape
    assert len(result.survivors) == 2 and result.checkpoint_scores == 4
    first = int(torch.nonzero(searcher.schedule.sigmas[:-1] <= 0.6)[0])
    assert result.transformer_calls == first * 4 + (4 - first) * 2
