"""Parameter counts and scoring FLOPs of each backbone's reward model at the real generator configs,
on the ``meta`` device (no weights are allocated): the whole transformer, what the reward model
keeps of it, the LoRA and the reward head, with the authors' settings; and the analytic GFLOPs to
score one 1024x1024 image at one noise level (``eval/cost.py``, the number in eval's cost column).

    python bench/backbone_params.py
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel, ZImageTransformer2DModel

from dina_lrm import DiNaConfig, DiNaLRM
from dina_lrm.eval.cost import scoring_flops
from dina_lrm.rewards import Setting

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                   joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
Z_IMAGE_TURBO = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
                     n_kv_heads=30, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
HEAD_1536 = {"use_proj_in": True, "width": 1536, "num_attn_heads": 8}
RELEASES = {  # name: (transformer class, its config, the reward model's config, text tokens at scoring)
    "SD3.5-M, 12 layers": (SD3Transformer2DModel, SD35_MEDIUM, {"num_transformer_layers": 12}, 77 + 128),
    "FLUX.1-dev, 19 double blocks": (FluxTransformer2DModel, FLUX_DEV, {
        "backbone_model_id": "black-forest-labs/FLUX.1-dev", "num_transformer_layers": 19, "visual_head_idx": [8, 12, 16, 19],
        "text_head_idx": [8, 12, 16, 19], "lora_config": {"r": 64, "lora_alpha": 128}, "reward_head": HEAD_1536}, 128),
    "Z-Image-Turbo, 16 layers (+2+2 refiners)": (ZImageTransformer2DModel, Z_IMAGE_TURBO, {
        "backbone_model_id": "Tongyi-MAI/Z-Image-Turbo", "num_transformer_layers": 16, "visual_head_idx": [4, 8, 12, 16],
        "text_head_idx": [4, 8, 12, 16], "lora_config": {"r": 32, "lora_alpha": 64}, "reward_head": {**HEAD_1536, "t_emb_dim": 256}}, 128),
    "Qwen-Image, 20 blocks (no released config: our example)": (QwenImageTransformer2DModel, QWEN_IMAGE, {
        "backbone_model_id": "Qwen/Qwen-Image", "num_transformer_layers": 20, "visual_head_idx": [5, 10, 15, 20],
        "text_head_idx": [5, 10, 15, 20], "lora_config": {"r": 64, "lora_alpha": 128}, "reward_head": HEAD_1536}, 128),
}


def count(parameters) -> float:
    return sum(p.numel() for p in parameters) / 1e6


def main() -> None:
    print("| reward model | generator transformer (M) | kept by the reward model (M) | LoRA (M) | reward head (M) "
          "| GFLOPs per 1024^2 image, one level (text tokens) |")
    print("|---|---|---|---|---|---|")
    for name, (cls, config, model, text_tokens) in RELEASES.items():
        with torch.device("meta"):
            transformer = cls(**config)
            whole = count(transformer.parameters())
            reward = DiNaLRM(DiNaConfig.from_dict({"model": model}), transformer)
        kept = count(p for n, p in reward.base_backbone.named_parameters() if "lora_" not in n)
        lora = count(p for n, p in reward.named_parameters() if "lora_" in n)
        channels = reward.base_backbone.latent_channels
        gflops = scoring_flops(reward, (channels, 128, 128), text_tokens, Setting((0.4,), 1)) / 1e9
        print(f"| {name} | {whole:,.0f} | {kept:,.0f} | {lora:.1f} | {count(reward.reward_head.parameters()):.1f} "
              f"| {gflops:,.0f} ({text_tokens}) |")


if __name__ == "__main__":
    main()
