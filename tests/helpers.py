"""Helpers the tests share (fixtures live in conftest.py): tiny configs, LoRA weights a test can tell
apart from the initial ones, latents, accelerate's process-wide state, a one-step learning check."""

import torch

from dina_lrm import DiNaConfig, DiNaLRM

TINY_MODEL = {
    "num_transformer_layers": 3,
    "visual_head_idx": [1, 2, 3],
    "text_head_idx": [1, 2, 3],
    "lora_config": {"r": 4, "lora_alpha": 8},
    "reward_head": {"num_attn_heads": 4},
}
ALIGN_PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow stars"]


def tiny_config(**model_overrides) -> DiNaConfig:
    return DiNaConfig.from_dict({"model": {**TINY_MODEL, **model_overrides}})


def randomize_lora(model: DiNaLRM, seed: int = 0) -> None:
    """LoRA B starts at zero; give it values so a test can tell whether LoRA weights were loaded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def make_latents(batch=2, size=8, seed=0):
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


def reset_accelerate() -> None:
    """Each Trainer builds its own Accelerator; accelerate keeps process-wide state between them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def margin_before_and_after_one_step(model: DiNaLRM, latents: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> tuple[float, float]:
    """The mean chosen-minus-rejected margin before and after one SGD step of the Thurstone loss on
    pairs chosen = latents + 0.5, rejected = latents - 0.5 (shared sigma and noise, as in training)."""
    from dina_lrm.train.step import PairNoise, PreferenceBatch, preference_forward

    batch = PreferenceBatch(latents + 0.5, latents - 0.5, states, pooled)
    count = len(latents)
    noise = PairNoise(torch.full((count,), 0.4), torch.full((count,), 400.0), torch.randn(latents.shape, generator=torch.Generator().manual_seed(5)))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    before = preference_forward(model.train(), batch, noise)
    before.loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = preference_forward(model, batch, noise)
    return (before.chosen_scores - before.rejected_scores).mean().item(), (after.chosen_scores - after.rejected_scores).mean().item()
