"""DiNa-LRM: a generator's own transformer (first N blocks) plus the reward head."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from dina_lrm.config import DiNaConfig, ModelConfig, load_config
from dina_lrm.models import checkpoint as ckpt
from dina_lrm.models.backbone import BackboneOutput
from dina_lrm.models.backbones import backbone_for, backbone_name
from dina_lrm.models.lora import add_lora, load_lora_weights
from dina_lrm.models.reward_head import RewardHead


class DiNaLRM(nn.Module):
    """Scores noisy latents: ``forward(latents, encoder_hidden_states, pooled_projections, timesteps)``
    returns raw scores (B, 1).

    ``transformer`` is the generator's transformer (a diffusers ``SD3Transformer2DModel``,
    ``FluxTransformer2DModel``, ``ZImageTransformer2DModel`` or ``QwenImageTransformer2DModel``;
    ``models/backbones.py`` picks the backbone from its class); its first
    ``model.num_transformer_layers`` blocks are shared, not copied. For generators without pooled text
    (Z-Image, Qwen-Image) ``pooled_projections`` is the text attention mask (B, tokens) that their
    prompt encoders return beside the embeddings.
    """

    def __init__(self, config: DiNaConfig | ModelConfig, transformer: nn.Module):
        super().__init__()
        self.config = config if isinstance(config, DiNaConfig) else DiNaConfig(model=config)
        model_cfg = self.config.model
        model_cfg.validate()
        if any("lora_" in name for name, _ in transformer.named_parameters()):
            raise ValueError(
                "this transformer already carries LoRA layers (another DiNaLRM shares its blocks); "
                "pass a fresh transformer, e.g. copy.deepcopy(pipe.transformer) or a new from_pretrained"
            )
        backbone = self.kept_modules(self.config, transformer)
        self.backbone_name = backbone_name(transformer)  # the registry's name: sd3, flux, zimage, qwenimage
        stated = model_cfg.reward_head.t_emb_dim
        if stated is not None and stated != backbone.temb_dim:
            raise ValueError(f"model.reward_head.t_emb_dim={stated}, but the {self.backbone_name} backbone's time embedding is {backbone.temb_dim} wide")
        if model_cfg.backbone_mode == "lora":
            text_taps = model_cfg.text_taps
            exclude = not text_taps or text_taps[-1] != model_cfg.num_transformer_layers
            backbone = add_lora(backbone, model_cfg.lora_config, exclude_last_text_stream=exclude)
        else:
            backbone.requires_grad_(model_cfg.backbone_mode == "full")
        self.backbone = backbone
        self.autocast_dtype: torch.dtype | None = None  # enable_autocast
        reference = next(p for name, p in self.base_backbone.named_parameters() if "lora_" not in name)
        base = self.base_backbone
        self.reward_head = RewardHead(
            model_cfg.reward_head, base.hidden_size, len(model_cfg.visual_taps), len(model_cfg.text_taps), base.temb_dim
        ).to(device=reference.device, dtype=reference.dtype)

    @staticmethod
    def kept_modules(config: DiNaConfig, transformer: nn.Module) -> nn.Module:
        """The part of ``transformer`` a reward of ``config`` reads: its backbone (embeddings and the first
        blocks), before LoRA. Everything else (later blocks, the output norm and projection) it never uses."""
        model = config.model
        return backbone_for(transformer, model.backbone, model.backbone_model_id)(
            transformer, model.num_transformer_layers, model.visual_taps, model.text_taps
        )

    @property
    def base_backbone(self) -> nn.Module:
        return self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone

    @property
    def device(self) -> torch.device:
        return next(self.reward_head.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.reward_head.parameters()).dtype

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each kept block in the backward pass instead of storing its activations."""
        self.base_backbone.gradient_checkpointing = enabled

    def enable_autocast(self, dtype: torch.dtype | None = torch.bfloat16) -> None:
        """Run the backbone under autocast to ``dtype`` (bfloat16 or float16; None turns it off). The
        head keeps its own precision: the features are cast back to it before the head reads them."""
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast takes torch.bfloat16 or torch.float16, got {dtype}")
        self.autocast_dtype = dtype

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` every kept block in place (``options`` go to ``torch.compile``). The first
        call at each input shape compiles; the embeddings and the head stay eager."""
        for blocks in self.base_backbone.children():
            if isinstance(blocks, nn.ModuleList):
                for block in blocks:
                    block.compile(**options)

    def check_latents(self, latents: torch.Tensor) -> None:
        backbone = self.base_backbone
        if latents.dim() == 5 and latents.shape[2] == 1 and getattr(backbone, "video_latents", False):
            latents = latents[:, :, 0]
        if latents.dim() != 4:
            raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
        channels, height, width = latents.shape[1:]
        if channels != backbone.latent_channels:
            raise ValueError(
                f"latents have {channels} channels but the backbone expects {backbone.latent_channels}; "
                "pass VAE latents of this generator (or images, which the scorer encodes)"
            )
        if height % backbone.patch_size or width % backbone.patch_size:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {backbone.patch_size}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or inf")

    def check_inputs(self, latents, encoder_hidden_states, pooled_projections) -> None:
        self.check_latents(latents)
        backbone, batch = self.base_backbone, latents.shape[0]
        if backbone.pooled_width is None and pooled_projections.shape[-1:] != encoder_hidden_states.shape[1:2]:
            raise ValueError(f"a {self.backbone_name} reward takes the text mask (B, tokens) in place of pooled_projections; "
                             f"got {tuple(pooled_projections.shape)} beside encoder_hidden_states {tuple(encoder_hidden_states.shape)}")
        pooled_width = encoder_hidden_states.shape[1] if backbone.pooled_width is None else backbone.pooled_width
        for name, tensor, dims, width in (
            ("encoder_hidden_states", encoder_hidden_states, 3, backbone.text_width),
            ("pooled_projections", pooled_projections, 2, pooled_width),
        ):
            if tensor.dim() != dims or tensor.shape[0] != batch or tensor.shape[-1] != width:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {dims} dims, batch {batch}, width {width}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name} contain NaN or inf")

    def features(self, latents, encoder_hidden_states, pooled_projections, timesteps) -> BackboneOutput:
        self.check_inputs(latents, encoder_hidden_states, pooled_projections)
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        if self.autocast_dtype is None:
            return self.backbone(latents, encoder_hidden_states, pooled_projections, timesteps)
        with torch.autocast(latents.device.type, dtype=self.autocast_dtype):
            out = self.backbone(latents, encoder_hidden_states, pooled_projections, timesteps)
        return out.to(self.dtype)

    def forward(self, latents, encoder_hidden_states, pooled_projections, timesteps) -> torch.Tensor:
        out = self.features(latents, encoder_hidden_states, pooled_projections, timesteps)
        return self.reward_head(out.visual, out.text, out.temb, out.text_mask)

    def forward_ensemble(self, latents, encoder_hidden_states, pooled_projections, timesteps,
                         max_batch_items: int | None = None) -> torch.Tensor:
        """Multi-noise-level score (B, 1). ``latents``: (K, B, C, H, W) or K tensors (B, C, H, W), one
        per noise level; ``timesteps``: (K, B), (K,), or K tensors of shape (B,) (the authors' form).
        The head reads all K levels' tokens at once.

        ``max_batch_items`` bounds the latents one backbone pass holds: by default one level's batch
        (B), so the peak memory is the per-level loop's; a larger bound runs several levels as one
        batch (faster where per-pass overhead dominates, e.g. small batches on a GPU, at K times the
        activation memory), a smaller one also splits the batch. Each level's features become the
        head's small adapter tokens as soon as they are computed; scores do not depend on the bound."""
        latents = torch.stack(list(latents)) if not torch.is_tensor(latents) else latents
        levels, batch = latents.shape[:2]
        if isinstance(timesteps, (list, tuple)) and timesteps and torch.is_tensor(timesteps[0]):
            timesteps = torch.stack([t.reshape(-1) for t in timesteps])
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(levels, -1).expand(levels, batch)
        bound = batch if max_batch_items is None else max_batch_items
        if bound < 1:
            raise ValueError(f"max_batch_items must be >= 1, got {bound}")
        if batch > bound:
            parts = [slice(i, i + bound) for i in range(0, batch, bound)]
            return torch.cat([self.forward_ensemble(latents[:, part], encoder_hidden_states[part], pooled_projections[part],
                                                    timesteps[:, part], bound) for part in parts])
        per_pass = bound // batch
        tokens, text_mask = [], None
        for first in range(0, levels, per_pass):
            count = min(per_pass, levels - first)
            out = self.features(
                latents[first:first + count].flatten(0, 1),
                encoder_hidden_states.repeat(count, 1, 1),
                pooled_projections.repeat(count, 1),
                timesteps[first:first + count].reshape(-1),
            )
            for level in out.chunk(count):
                tokens.append(self.reward_head.tokens(level.visual, level.text, level.temb))
                text_mask = level.text_mask
        return self.reward_head.score_levels(tokens, text_mask)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the release layout: config.json and checkpoint/{rm_head.safetensors, rm_head.pt, backbone_lora/}
        (``rm_head.pt`` so that the authors' inference code loads our checkpoints too), then manifest.json
        with every file's SHA-256."""
        directory = Path(directory)
        checkpoint_dir = directory / "checkpoint"
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_config(directory, self.config.to_dict())
        ckpt.write_weights(checkpoint_dir / ckpt.HEAD_NAME, self.reward_head)
        ckpt.write_release_head(checkpoint_dir / ckpt.RELEASE_HEAD_NAME, self.reward_head)
        mode = self.config.model.backbone_mode
        if mode == "lora":
            self.backbone.save_pretrained(str(checkpoint_dir / ckpt.LORA_DIR))
        elif mode == "full":
            ckpt.write_weights(checkpoint_dir / ckpt.BACKBONE_NAME, self.base_backbone)
        written = [directory / ckpt.CONFIG_NAME, *(p for p in checkpoint_dir.rglob("*") if p.is_file())]
        ckpt.write_manifest(directory, written)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, transformer: nn.Module) -> DiNaLRM:
        """Load our checkpoints or the release's, onto ``transformer``'s device and dtype (eval mode).
        ``directory``: a local directory or a hub id such as ``liuhuohuo/DiNa-LRM-SD35M-12layers``.

        Raises :class:`~dina_lrm.models.checkpoint.CheckpointError`, naming the file, when a file differs
        from the checkpoint's manifest (ours carry one), a weight is NaN or inf, or the weights do not
        fit the model."""
        directory = ckpt.open_directory(directory)
        model = cls(load_config(directory / ckpt.CONFIG_NAME), transformer)
        checkpoint_dir = directory / "checkpoint"
        mode = model.config.model.backbone_mode
        if mode == "full" and (checkpoint_dir / ckpt.RELEASE_FULL_NAME).is_file():
            full = ckpt.read_state_dict(checkpoint_dir / ckpt.RELEASE_FULL_NAME)
            ckpt.load_strict(model.reward_head, full, "full_model.pt (reward_head)", prefix="reward_head.")
            ckpt.load_strict(model.base_backbone, full, "full_model.pt (backbone)", prefix="backbone.")
            return model.eval()
        head_path = ckpt.find_file(checkpoint_dir, ckpt.HEAD_NAME, ckpt.RELEASE_HEAD_NAME)
        ckpt.load_strict(model.reward_head, ckpt.read_state_dict(head_path), str(head_path))
        if mode == "lora":
            load_lora_weights(model.backbone, checkpoint_dir / ckpt.LORA_DIR)
        elif mode == "full":
            path = ckpt.find_file(checkpoint_dir, ckpt.BACKBONE_NAME)
            ckpt.load_strict(model.base_backbone, ckpt.read_state_dict(path), str(path))
        return model.eval()
