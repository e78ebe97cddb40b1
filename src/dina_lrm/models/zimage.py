"""Z-Image backbone: the refiners and first N single-stream layers of a diffusers ``ZImageTransformer2DModel``.

The authors' Z-Image-Turbo reward model keeps the patch, time and caption embeddings, the pad tokens,
the rotary embedder, the 2 noise-refiner blocks (image only, time-modulated), the 2 context-refiner
blocks (text only) and the first 16 of 30 main layers. It takes the SD3 call and applies Z-Image's
conventions inside:

* the model time is (1000 - t) / 1000 = 1 - sigma (times ``t_scale``), and the head's time
  embedding is that 256-wide adaLN input; there is no pooled text and no guidance;
* latents (B, 16, h, w) become 2x2 patches with features in (row, column, channel) order; image and
  caption are each padded to a multiple of 32 tokens with their pad tokens, and one sequence per
  sample runs through the main layers, **image first**, then the caption;
* position ids: caption token j is (1 + j, 0, 0), image token (caption length + 1, row, column),
  image padding (0, 0, 0);
* after a tapped layer the image tokens (with their padding) are the visual features and the caption
  tokens (with theirs) the text features. Captions differ in length: ``pooled_projections`` carries
  the prompt encoder's text mask, and the head ignores the tokens that only fill out the batch, so a
  sample scores the same alone or in any batch (the authors train at batch 1).
"""

from __future__ import annotations

import torch
from torch import nn

from dina_lrm.models.backbone import BackboneOutput, attention_flops, linear_flops, check_kept_layers

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]
SEQUENCE_MULTIPLE = 32  # Z-Image pads image and caption to multiples of this
PATCH = 2


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches, features in (row, column, channel) order."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(batch, (height // PATCH) * (width // PATCH), channels * PATCH * PATCH)


def padded_length(length: torch.Tensor | int) -> torch.Tensor | int:
    return length + (-length) % SEQUENCE_MULTIPLE


def position_ids(rows: int, columns: int, caption_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position ids of the padded image (B, N_image, 3) and caption (N_caption, 3) tokens;
    ``caption_lengths`` are the padded caption lengths per sample."""
    tokens = rows * columns
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij"), dim=-1).reshape(-1, 2)
    image = torch.zeros(len(caption_lengths), padded_length(tokens), 3, dtype=torch.long)
    image[:, :tokens, 0] = caption_lengths.cpu()[:, None] + 1
    image[:, :tokens, 1:] = grid
    caption = torch.zeros(int(caption_lengths.max()), 3, dtype=torch.long)
    caption[:, 0] = torch.arange(1, len(caption) + 1)
    return image, caption


class ZImageBackbone(nn.Module):
    def __init__(self, transformer: nn.Module, num_layers: int, visual_taps: list[int], text_taps: list[int]):
        super().__init__()
        check_kept_layers(len(transformer.layers), num_layers, visual_taps, text_taps, "main layers")
        if 0 in visual_taps or 0 in text_taps:
            raise ValueError("the Z-Image backbone has no tap 0 (the embedded inputs never share a sequence); taps start at 1")
        config = transformer.config
        self.x_embedder = transformer.all_x_embedder[f"{PATCH}-1"]
        self.t_embedder = transformer.t_embedder
        self.cap_embedder = transformer.cap_embedder
        self.x_pad_token = transformer.x_pad_token
        self.cap_pad_token = transformer.cap_pad_token
        self.rope_embedder = transformer.rope_embedder  # a plain object (no weights): precomputed rotary tables
        self.noise_refiner = transformer.noise_refiner
        self.context_refiner = transformer.context_refiner
        self.layers = nn.ModuleList(transformer.layers[:num_layers])
        self.visual_taps = list(visual_taps)
        self.text_taps = list(text_taps)
        self.t_scale = config.t_scale
        self.hidden_size = config.dim
        self.temb_dim = self.t_embedder.mlp[-1].out_features
        self.latent_channels = config.in_channels
        self.patch_size = PATCH
        self.text_width = config.cap_feat_dim
        self.pooled_width = None  # pooled_projections carries the text mask
        self.gradient_checkpointing = False

    @staticmethod
    def latent_patch_size(config) -> int:
        return PATCH

    def lora_target_modules(self, exclude_last_text_stream: bool) -> tuple[list[str], list[str]]:
        """The authors' rule: the four attention projections of the refiners and every kept layer."""
        return list(ATTENTION_PROJECTIONS), []

    def feature_tokens(self, image_tokens: int, text_tokens: int) -> tuple[int, int]:
        return padded_length(image_tokens), padded_length(text_tokens)

    def flops(self, image_tokens: int, text_tokens: int) -> int:
        """``image_tokens`` and ``text_tokens`` before the padding to multiples of 32 (counted here)."""
        image, caption = padded_length(image_tokens), padded_length(text_tokens)

        def tokens_for(name: str) -> int:
            if name.startswith("t_embedder") or "adaLN_modulation" in name:
                return 1
            if name.startswith("x_embedder"):
                return image_tokens
            if name.startswith(("cap_embedder", "context_refiner")):
                return caption
            return image if name.startswith("noise_refiner") else image + caption

        width = self.hidden_size
        attention = len(self.noise_refiner) * attention_flops(image, image, width) + len(self.context_refiner) * attention_flops(caption, caption, width)
        return linear_flops(self, tokens_for) + attention + len(self.layers) * attention_flops(image + caption, image + caption, width)

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _image(self, latents: torch.Tensor, adaln: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
        tokens = self.x_embedder(patchify(latents))
        padding = padded_length(tokens.shape[1]) - tokens.shape[1]
        tokens = torch.cat([tokens, self.x_pad_token.to(tokens.dtype).expand(len(tokens), padding, -1)], dim=1)
        for block in self.noise_refiner:
            tokens = self._run(block, tokens, None, rotary, adaln)
        return tokens

    def _caption(self, states: torch.Tensor, lengths: torch.Tensor, padded: torch.Tensor, rotary: torch.Tensor):
        """Embedded, padded and refined captions (B, max padded length, D) and their mask."""
        width = int(padded.max())
        states = nn.functional.pad(states[:, :width], (0, 0, 0, max(0, width - states.shape[1])))
        caption = self.cap_embedder(states)
        position = torch.arange(width, device=states.device)
        own_padding = (position[None] >= lengths[:, None]) & (position[None] < padded[:, None])
        caption = torch.where(own_padding[..., None], self.cap_pad_token.to(caption.dtype), caption)
        mask = position[None] < padded[:, None]
        attention_mask = None if bool(mask.all()) else mask
        for block in self.context_refiner:
            caption = self._run(block, caption, attention_mask, rotary.expand(len(caption), -1, -1))
        return caption, mask

    def forward(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> BackboneOutput:
        """``pooled_projections``: the text mask (B, tokens) of ``encoder_hidden_states``."""
        lengths = (pooled_projections > 0.5).sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("a Z-Image text mask selects no token for some prompt")
        padded = padded_length(lengths)
        dtype = encoder_hidden_states.dtype
        time = (1000 - timesteps.float()) / 1000
        adaln = self.t_embedder(time * self.t_scale).to(dtype)
        image_ids, caption_ids = position_ids(latents.shape[-2] // PATCH, latents.shape[-1] // PATCH, padded)
        image_rotary = self.rope_embedder(image_ids.flatten(0, 1).to(latents.device)).view(*image_ids.shape[:2], -1)
        caption_rotary = self.rope_embedder(caption_ids.to(latents.device))[None]
        image = self._image(latents.to(dtype), adaln, image_rotary)
        caption, caption_mask = self._caption(encoder_hidden_states, lengths, padded, caption_rotary)
        image_tokens = image.shape[1]
        sequence_mask = torch.cat([torch.ones_like(caption_mask[:, :1]).expand(-1, image_tokens), caption_mask], dim=1)
        attention_mask = None if bool(sequence_mask.all()) else sequence_mask
        rotary = torch.cat([image_rotary, caption_rotary.expand(len(image), -1, -1)], dim=1)

        hidden, visual, text = torch.cat([image, caption], dim=1), [], []
        for depth, block in enumerate(self.layers, start=1):
            hidden = self._run(block, hidden, attention_mask, rotary, adaln)
            if depth in self.visual_taps:
                visual.append(hidden[:, :image_tokens])
            if depth in self.text_taps:
                text.append(hidden[:, image_tokens:])
        return BackboneOutput(temb=adaln, visual=visual, text=text, text_mask=caption_mask)
