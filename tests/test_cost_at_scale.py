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


def _tiny_reward(device: str, checkpointing: bool = False, half: bool = False) -> DiNaLRM:
    """A 4-block SD3 reward (3 kept), built the same way on ``device``; ``half``: the trainer's bf16
    recipe (frozen weights in bf16, LoRA and head in float32)."""
    from diffusers import SD3Transformer2DModel

    with torch.device(device):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                            attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                            caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=32, qk_norm="rms_norm")
        model = DiNaLRM(DiNaConfig.from_dict({"model": {"num_transformer_layers": 3, "visual_head_idx": [1, 3], "text_head_idx": [1, 3],
                                                         "lora_config": {"r": 8, "lora_alpha": 16}, "reward_head": {"num_attn_heads": 4}}}),
                        transformer)
    if half:
        model.to(torch.bfloat16)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    model.enable_gradient_checkpointing(checkpointing)
    return model


def test_held_bytes_count_the_position_table_and_shared_storages_once():
    from dina_lrm.eval.cost import held_bytes

    model = _tiny_reward("meta")
    parameters = sum(p.numel() * 4 for p in model.parameters())
    table = model.base_backbone.pos_embed.pos_embed
    assert table.shape == (1, 32 * 32, 64) and held_bytes(model) == parameters + table.numel() * 4
    assert held_bytes(model, model.base_backbone) == held_bytes(model)


def _counted(run) -> int:
    from dina_lrm.eval.cost import LiveActivations

    with LiveActivations() as live:
        run()
    return live.peak


def test_the_predicted_scoring_memory_equals_a_real_run_within_10_percent():
    """The prediction runs the model on fake tensors (nothing allocated); the same call on real tensors,
    counted op by op, agrees: single level and a 3-level ensemble."""
    from dina_lrm.eval.cost import held_bytes, scoring_memory

    real = _tiny_reward("cpu").eval()
    for levels, batch in ((1, 2), (3, 2)):
        predicted = scoring_memory(_tiny_reward("meta"), (4, 16, 16), 20, levels, batch)
        latents, states, pooled = torch.randn(levels, batch, 4, 16, 16), torch.randn(batch, 20, 64), torch.randn(batch, 32)
        with torch.no_grad():
            measured = _counted(lambda: real.forward_ensemble(latents, states, pooled, torch.full((levels,), 500.0)))
        assert predicted.weights == held_bytes(real)
        assert abs(predicted.peak - measured) <= 0.1 * measured, (levels, predicted.peak, measured)


def test_the_predicted_training_memory_equals_a_real_step_within_10_percent():
    """LoRA and head trainable, with and without gradient checkpointing, in float32 and in the trainer's
    bf16 recipe: activations, what autograd saves for the trained weights and the gradients."""
    from dina_lrm.eval.cost import training_memory

    peaks = {}
    for checkpointing in (False, True):
        for half in (False, True):
            predicted = training_memory(_tiny_reward("meta", checkpointing, half), (4, 16, 16), 20, 2,
                                        torch.bfloat16 if half else None)
            peaks[checkpointing, half] = predicted.peak
            real = _tiny_reward("cpu", checkpointing, half).train()
            dtype = torch.bfloat16 if half else torch.float32
            latents, states, pooled = torch.randn(4, 4, 16, 16, dtype=dtype), torch.randn(4, 20, 64, dtype=dtype), torch.randn(4, 32, dtype=dtype)

            def step():
                with torch.autocast("cpu", torch.bfloat16, enabled=half):
                    scores = real(latents, states, pooled, torch.full((4,), 500.0))[:, 0]
                (scores[:2] - scores[2:]).float().mean().backward()

            measured = _counted(step)
            trained = sum(p.numel() * 4 for p in real.parameters() if p.requires_grad)
            assert predicted.optimizer == 2 * trained and all(p.grad is not None for p in real.parameters() if p.requires_grad)
            assert abs(predicted.peak - measured) <= 0.1 * measured, (checkpointing, half, predicted.peak, measured)
    assert peaks[True, False] < peaks[False, False] and peaks[True, True] < peaks[False, True]
