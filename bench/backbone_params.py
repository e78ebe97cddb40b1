"""Parameter counts of each backbone's reward model at the real generator configs, on the ``meta``
device (no weights are allocated): the whole transformer, what the reward model keeps of it, the
LoRA and the reward head, with the authors' release settings.

    python bench/backbone_params.py
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from dina_lrm import DiNaConfig, DiNaLRM

SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                   joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
RELEASES = {  # the authors' YAMLs (configs/sd35m-thurstone-12layer.yaml; their flux/thurstone-19layer.yaml)
    "SD3.5-M, 12 layers": (SD3Transformer2DModel, SD35_MEDIUM, {"num_transformer_layers": 12}),
    "FLUX.1-dev, 19 double blocks": (FluxTransformer2DModel, FLUX_DEV, {
        "backbone_model_id": "black-forest-labs/FLUX.1-dev", "num_transformer_layers": 19, "visual_head_idx": [8, 12, 16, 19],
        "text_head_idx": [8, 12, 16, 19], "lora_config": {"r": 64, "lora_alpha": 128},
        "reward_head": {"use_proj_in": True, "width": 1536, "num_attn_heads": 8}}),
}


def count(parameters) -> float:
    return sum(p.numel() for p in parameters) / 1e6


def main() -> None:
    print("| reward model | generator transformer (M) | kept by the reward model (M) | LoRA (M) | reward head (M) |")
    print("|---|---|---|---|---|")
    for name, (cls, config, model) in RELEASES.items():
        with torch.device("meta"):
            transformer = cls(**config)
            whole = count(transformer.parameters())
            reward = DiNaLRM(DiNaConfig.from_dict({"model": model}), transformer)
        kept = count(p for n, p in reward.base_backbone.named_parameters() if "lora_" not in n)
        lora = count(p for n, p in reward.named_parameters() if "lora_" in n)
        print(f"| {name} | {whole:,.0f} | {kept:,.0f} | {lora:.1f} | {count(reward.reward_head.parameters()):.1f} |")


if __name__ == "__main__":
    main()
