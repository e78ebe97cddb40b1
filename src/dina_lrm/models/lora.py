"""LoRA on the backbone's attention projections, through PEFT."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from torch import nn

from dina_lrm.config import LoraSettings

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def add_lora(backbone: nn.Module, settings: LoraSettings, exclude_last_text_stream: bool) -> PeftModel:
    """Wrap ``backbone`` in a PEFT model with trainable LoRA and frozen base weights.

    With gaussian init (the release's) ``lora_B`` starts at zero, so the wrapped backbone
    computes exactly what the plain one does until the first update.
    """
    targets, excluded = backbone.lora_target_modules(exclude_last_text_stream)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        init_lora_weights=settings.init_lora_weights,
        target_modules=targets,
        exclude_modules=excluded or None,
    )
    return get_peft_model(backbone, config)


def load_lora_weights(model: PeftModel, adapter_dir: Path) -> None:
    """Load a PEFT adapter saved by us or by the release, requiring every LoRA weight to match."""
    from dina_lrm.models.checkpoint import CheckpointError, read_safetensors

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"LoRA adapter weights missing: {path}")
    state = read_safetensors(path)
    expected = {k for k in model.state_dict() if "lora_" in k}
    result = set_peft_model_state_dict(model, state)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if k in expected]
    if unexpected or missing:
        raise CheckpointError(
            f"LoRA adapter {path} does not fit this backbone: {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:2]}), {len(missing)} LoRA weights missing (e.g. {missing[:2]}); "
            "check model.num_transformer_layers, the taps and the backbone"
        )
