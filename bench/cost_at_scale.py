"""What a reward costs per image at real scale, on paper: FLOPs and memory of the 12-layer SD3.5-M
DiNa-LRM, of decode-then-score (the SD3.5 VAE decoder + a CLIP-H scorer) and of a VLM reward
(the VAE decoder + Qwen2-VL-7B, HPSv3's backbone), at 512^2 and 1024^2, forward and backward.

Every number is measured by ``dina_lrm.eval.cost.module_cost`` on the ``meta`` device (nothing is
allocated): FLOPs by torch's counter (a multiply-add is 2), attention accounted as a fused kernel
keeps it, parameters in bf16, the activations autograd keeps for the backward (the reward's weights
frozen, the gradient going to its input, as in ReFL), and the forward's peak of live activations.
The predicted time assumes an H100 SXM (989 dense bf16 TFLOP/s) at ``--utilisation``.

    python bench/cost_at_scale.py [--utilisation 0.4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

from dina_lrm import DiNaConfig, DiNaLRM
from dina_lrm.eval.cost import ModuleCost, module_cost

sys.path.insert(0, str(Path(__file__).parent))
from backbone_params import SD35_MEDIUM  # noqa: E402

H100_BF16_FLOPS = 989e12
TEXT_TOKENS, POOLED = 77 + 128, 2048  # SD3's text sequence (CLIP 77 + T5 128) and pooled width
SD35_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224, patch_size=14)
QWEN2_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     vocab_size=152064, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, in_channels=3))
VLM_PROMPT_TOKENS = 100  # the instruction and the prompt around the image tokens


def meta(make):
    with torch.device("meta"):
        return make().to(torch.bfloat16)


def zeros(*shape):
    return lambda: torch.zeros(*shape, device="meta", dtype=torch.bfloat16)


def dina_lrm(resolution: int) -> ModuleCost:
    model = meta(lambda: DiNaLRM(DiNaConfig.from_dict({"model": {"num_transformer_layers": 12}}), SD3Transformer2DModel(**SD35_MEDIUM)))
    side = resolution // 8
    states, pooled, timesteps = zeros(1, TEXT_TOKENS, 4096)(), zeros(1, POOLED)(), torch.full((1,), 400.0, device="meta")
    def score(m, latents):  # the model's forward without its input checks, which read values the meta device lacks
        out = m.backbone(latents, states, pooled, timesteps)
        return m.reward_head(out.visual, out.text, out.temb)

    return module_cost(model, zeros(1, 16, side, side), score)


def vae_decoder(resolution: int) -> ModuleCost:
    vae = meta(lambda: AutoencoderKL(**SD35_VAE))
    side = resolution // 8
    return module_cost(vae, zeros(1, 16, side, side), lambda m, z: m.decode(z).sample)


def clip_h() -> ModuleCost:
    clip = meta(lambda: CLIPVisionModel(CLIPVisionConfig(**CLIP_H)))
    return module_cost(clip, zeros(1, 3, 224, 224), lambda m, x: m(pixel_values=x).pooler_output)


def qwen2_vl(resolution: int) -> tuple[ModuleCost, ModuleCost]:
    """The vision tower at Qwen2-VL's own resize (sides rounded to multiples of 28) and the language
    model over the merged image tokens and the prompt."""
    model = meta(lambda: Qwen2VLForConditionalGeneration(Qwen2VLConfig(**QWEN2_VL_7B)))
    visual, patches = model.model.visual, 2 * round(resolution / 28)
    grid = torch.tensor([[1, patches, patches]])
    positions = get_vision_position_ids(grid, 2).to("meta")
    seqlens, longest = get_vision_attention_seqlens(grid, visual.config)
    vision = module_cost(visual, zeros(patches * patches, 3 * 2 * 14 * 14),
                         lambda m, x: m(x, grid_thw=grid, position_ids=positions, cu_seqlens=seqlens, max_seqlen=longest).pooler_output)
    tokens = patches * patches // 4 + VLM_PROMPT_TOKENS
    language = module_cost(model.model.language_model, zeros(1, tokens, 3584), lambda m, x: m(inputs_embeds=x).last_hidden_state)
    return vision, language


def total(*costs: ModuleCost) -> ModuleCost:
    """Modules run one after another: FLOPs, parameters and kept activations add; the forward peak is the largest."""
    return ModuleCost(sum(c.forward_flops for c in costs), sum(c.backward_flops for c in costs), sum(c.parameter_bytes for c in costs),
                      sum(c.saved_activation_bytes for c in costs), max(c.forward_activation_bytes for c in costs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utilisation", type=float, default=0.4, help="fraction of the H100's peak bf16 rate reached")
    args = parser.parse_args()
    rate = args.utilisation * H100_BF16_FLOPS
    print(f"| reward | resolution | forward TFLOPs | backward TFLOPs (to the input) | parameters GB (bf16) | kept for backward GB "
          f"| forward peak activations GB | H100 ms forward / forward+backward at {args.utilisation:.0%} |")
    print("|---|---|---|---|---|---|---|---|")
    for resolution in (512, 1024):
        decoder = vae_decoder(resolution)
        rewards = {
            "DiNa-LRM SD3.5-M, 12 layers (latents in)": dina_lrm(resolution),
            "decode + CLIP-H (224^2)": total(decoder, clip_h()),
            "decode + Qwen2-VL-7B (HPSv3's VLM)": total(decoder, *qwen2_vl(resolution)),
        }
        for name, cost in rewards.items():
            forward, backward = cost.forward_flops, cost.backward_flops
            print(f"| {name} | {resolution}^2 | {forward / 1e12:.2f} | {backward / 1e12:.2f} | {cost.parameter_bytes / 1e9:.2f} "
                  f"| {cost.saved_activation_bytes / 1e9:.2f} | {cost.forward_activation_bytes / 1e9:.2f} "
                  f"| {forward / rate * 1e3:.1f} / {(forward + backward) / rate * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
