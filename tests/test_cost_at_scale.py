"""The real-scale cost accounting (eval/cost.py module_cost, on the meta device) against hand counts."""

import torch
from torch import nn

from dina_lrm import DiNaConfig, DiNaLRM
from dina_lrm.eval.cost import module_cost, scoring_flops
from dina_lrm.rewards import Setting

BF16 = 2


def test_an_mlp_costs_what_its_shapes_say():
    with torch.device("meta"):
        mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32)).to(torch.bfloat16)
    cost = module_cost(mlp, lambda: torch.zeros(10, 64, device="meta", dtype=torch.bfloat16))
    matmuls = 2 * 10 * (64 * 256 + 256 * 32)
    assert cost.forward_flops == matmuls and cost.backward_flops == matmuls  # frozen weights: the input's gradient only
    assert cost.parameter_bytes == (64 * 256 + 256 + 256 * 32 + 32) * BF16
    assert cost.saved_activation_bytes == 10 * 256 * BF16  # GELU's input; frozen linears keep nothing
    assert cost.forward_activation_bytes == (10 * 64 + 10 * 256 + 10 * 256) * BF16  # input, first output, GELU output alive at once


class Attention(nn.Module):
    def forward(self, x):
        q, k, v = x.unbind(0)
        return nn.functional.scaled_dot_product_attention(q, k, v)


def test_attention_is_accounted_as_a_fused_kernel():
    heads, tokens, dim = 4, 512, 64
    cost = module_cost(Attention(), lambda: torch.zeros(3, 1, heads, tokens, dim, device="meta", dtype=torch.bfloat16))
    forward = 4 * heads * tokens * tokens * dim
    assert cost.forward_flops == forward and cost.backward_flops == forward + 2 * forward  # recompute, then dQ/dK/dV
    qkv_out = 4 * heads * tokens * dim * BF16
    assert cost.saved_activation_bytes == qkv_out + heads * tokens * 4  # q, k, v, output and the fp32 log-sum-exp, no N^2 matrix
    assert cost.forward_activation_bytes == (3 * heads * tokens * dim + heads * tokens * dim) * BF16


def test_the_reward_models_counted_forward_equals_the_analytic_count(pipe, text_inputs):
    with torch.device("meta"):
        model = DiNaLRM(DiNaConfig.from_dict({"model": {"num_transformer_layers": 3, "visual_head_idx": [1, 3], "text_head_idx": [1, 3],
                                                         "reward_head": {"num_attn_heads": 4}}}), type(pipe.transformer)(**pipe.transformer.config))
    states, pooled = (t.to("meta") for t in text_inputs)

    def score(m, latents):
        out = m.backbone(latents, states[:1], pooled[:1], torch.full((1,), 400.0, device="meta"))
        return m.reward_head(out.visual, out.text, out.temb)

    cost = module_cost(model, lambda: torch.zeros(1, 4, 8, 8, device="meta"), score)
    assert cost.forward_flops == scoring_flops(model, (4, 8, 8), states.shape[1], Setting((0.4,), 1))
    assert cost.backward_flops > cost.forward_flops > 0 and cost.saved_activation_bytes > 0
