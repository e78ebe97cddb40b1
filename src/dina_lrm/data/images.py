"""Images in, pixel tensors out: paths, PIL images or tensors -> float (3, H, W) in [0, 1]."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageInput = Union[str, Path, Image.Image, torch.Tensor]


def load_image(item: ImageInput) -> torch.Tensor:
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as image:
                item = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
    if isinstance(item, Image.Image):
        array = np.asarray(item.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if torch.is_tensor(item):
        return _check_tensor(item)
    raise TypeError(f"unsupported image type {type(item).__name__}: give a path, a PIL image or a tensor")


def _check_tensor(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensors must be (3, H, W), got {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise TypeError(f"image tensors must be uint8 or floating point in [0, 1], got {image.dtype}")
    if not torch.isfinite(image).all():
        raise ValueError("image tensor contains NaN or inf")
    if image.detach().min() < 0 or image.detach().max() > 1:
        raise ValueError(
            f"float image tensors must lie in [0, 1], got [{image.min():.3g}, {image.max():.3g}]; "
            "map [-1, 1] images with (x + 1) / 2"
        )
    return image


def load_images(images) -> list[torch.Tensor]:
    """A list of (3, H, W) tensors from a list of inputs or a (B, 3, H, W) tensor."""
    if torch.is_tensor(images):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(f"an image batch must be (B, 3, H, W), got {tuple(images.shape)}")
        return [load_image(image) for image in images]
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    return [load_image(item) for item in images]


def center_crop_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Crop (3, H, W) centrally so that H and W are multiples of ``multiple``."""
    height, width = image.shape[-2:]
    new_h, new_w = height // multiple * multiple, width // multiple * multiple
    if new_h == 0 or new_w == 0:
        raise ValueError(f"image {height}x{width} is smaller than the minimum size {multiple}x{multiple}")
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return image[..., top : top + new_h, left : left + new_w]


def vae_scale_factor(vae) -> int:
    """Pixels per latent side: 8 for the SD3 / FLUX VAE, ``2 ** len(temperal_downsample)`` for Qwen-Image's."""
    if vae is None:
        return 8
    if hasattr(vae.config, "temperal_downsample"):
        return 2 ** len(vae.config.temperal_downsample)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _channel_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1, 1)
    return (torch.tensor(vae.config.latents_mean).view(shape).to(like), torch.tensor(vae.config.latents_std).view(shape).to(like))


def vae_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C, h, w) of (B, 3, H, W) pixels in [0, 1], as the generator's pipelines
    normalise them: ``(mode - shift_factor) * scaling_factor`` (SD3, FLUX, Z-Image) or, for a video
    VAE with per-channel statistics (Qwen-Image), ``(mode - latents_mean) / latents_std`` of the one
    frame. The posterior mean keeps encoding deterministic."""
    config = vae.config
    pixels = (pixels * 2 - 1).to(vae.device, vae.dtype)
    if getattr(config, "latents_mean", None) is not None:
        latents = vae.encode(pixels[:, :, None]).latent_dist.mode()
        mean, std = _channel_statistics(vae, latents)
        return ((latents - mean) / std)[:, :, 0]
    latents = vae.encode(pixels).latent_dist.mode()
    return (latents - (config.shift_factor or 0.0)) * config.scaling_factor


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [0, 1] from normalised latents (the inverse of :func:`vae_encode`)."""
    config = vae.config
    latents = latents.to(vae.device, vae.dtype)
    if getattr(config, "latents_mean", None) is not None:
        mean, std = _channel_statistics(vae, latents)
        pixels = vae.decode(latents[:, :, None] * std + mean).sample[:, :, 0]
    else:
        pixels = vae.decode(latents / config.scaling_factor + (config.shift_factor or 0.0)).sample
    return ((pixels + 1) / 2).clamp(0, 1)
