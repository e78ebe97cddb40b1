"""``dina-lrm toyworld pretrain``: train the toy generator from scratch on renders of train prompts.

1. the VAE, on random 32x32 crops of renders (a third of them with a quality defect, so defective
   images encode too), with an L1 + tiny KL loss; its latent shift/scale are then calibrated (or,
   with ``vae_from``, an already trained toy VAE is reused: a generator in the same latent space);
   with ``generator_from``, a whole saved toy pipeline is the starting point and stage 2 continues
   its training (a longer-pretrained generator without redoing the first run);
   with ``confusion_rate``, a share of the renders draws an object group in its ``CONFUSIONS`` colour
   under the unchanged caption: a short continuation then installs a systematic, learnable bias
   (the biased base of the alignment experiment, :data:`BIASED_BASE_RECIPE`);
2. the transformer and both text encoders together, by rectified flow (SD3's objective and
   logit-normal timesteps) on the VAE latents, with 10% of prompts dropped for classifier-free
   guidance. An exponential moving average of the weights is what gets saved (it samples cleaner
   shapes than the last iterate). Held-out colour-shape combinations are never shown.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from dina_lrm import DTYPES, SD3PromptEncoder, load_pipeline
from dina_lrm_toyworld.config import PretrainConfig
from dina_lrm_toyworld.corruptions import DEFECTS, add_defect
from dina_lrm_toyworld.generator import T5_TOKENS, build_toy_pipeline, decode_latents, encode_latents, images_to_tensor
from dina_lrm_toyworld.scenes import confused, render, sample_prompt, scene_for

UNCONDITIONAL_PROMPT = ""


def render_training_images(count: int, rng: np.random.Generator, defect_rate: float = 0.0,
                           confusion_rate: float = 0.0) -> tuple[list[str], np.ndarray]:
    """Prompts of the train split and a render of each, some with a random-strength defect, some
    object groups (``confusion_rate``) drawn in their confusion colour."""
    prompts, images = [], []
    for _ in range(count):
        spec = sample_prompt(rng, "train")
        image = render(scene_for(confused(spec, confusion_rate, rng) if confusion_rate else spec, rng))
        if rng.random() < defect_rate:
            image = add_defect(image, str(rng.choice(DEFECTS)), rng, strength=float(rng.uniform(0.3, 1.0)))
        prompts.append(spec.text)
        images.append(image)
    return prompts, np.stack(images)


def _random_crops(images: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    top, left = rng.integers(0, images.shape[-1] - size + 1, size=2)
    return images[..., top : top + size, left : left + size]


def train_vae(pipe: StableDiffusion3Pipeline, config: PretrainConfig, rng: np.random.Generator) -> list[float]:
    vae = pipe.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.vae_steps)
    losses = []
    for _ in tqdm(range(config.vae_steps), desc="VAE", mininterval=5):
        _, images = render_training_images(config.vae_batch, rng, config.defect_rate)
        pixels = _random_crops(images_to_tensor(images), config.vae_crop, rng)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (reconstruction - pixels).abs().mean() + config.kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    _, images = render_training_images(256, rng)
    calibrate_vae_normalisation(vae, (images_to_tensor(images) + 1) / 2)
    return losses


def reconstruction_psnr(vae, images: np.ndarray) -> float:
    """Mean PSNR (dB) of the VAE round trip (encode mode, decode) over (N, H, W, 3) uint8 images."""
    decoded = decode_latents(vae, encode_latents(vae, images_to_tensor(images))).astype(np.float64)
    mse = ((decoded - images.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def train_generator(
    pipe: StableDiffusion3Pipeline, prompts: list[str], latents: torch.Tensor, config: PretrainConfig
) -> list[float]:
    """Rectified flow: x_s = (1 - s) x0 + s eps, predict eps - x0, s = sigmoid(N(0, 1))."""
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    prompt_encoder = SD3PromptEncoder.from_pipeline(pipe, max_sequence_length=T5_TOKENS)
    modules = [pipe.transformer, *(encoders if config.train_text_encoders else [])]
    for module in modules:
        module.train().requires_grad_(True)
    params = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.generator_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, config))
    ema = EMAModel(params, decay=config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in tqdm(range(config.generator_steps), desc="generator", mininterval=5):
        index = torch.randint(len(prompts), (config.generator_batch,), generator=generator)
        dropped = torch.rand(config.generator_batch, generator=generator) < config.cfg_dropout
        batch_prompts = [UNCONDITIONAL_PROMPT if drop else prompts[i] for i, drop in zip(index.tolist(), dropped)]
        states, pooled = prompt_encoder.encode(batch_prompts)
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(config.generator_batch, generator=generator))
        noisy = (1 - sigma[:, None, None, None]) * clean + sigma[:, None, None, None] * noise
        prediction = pipe.transformer(
            noisy, encoder_hidden_states=states, pooled_projections=pooled, timestep=sigma * 1000
        ).sample
        loss = (prediction - (noise - clean)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        losses.append(loss.item())
    ema.copy_to(params)
    for module in modules:
        module.eval().requires_grad_(False)
    return losses


def _warmup_cosine(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.generator_steps - config.warmup_steps, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(out_dir: str | Path, config: PretrainConfig | None = None) -> StableDiffusion3Pipeline:
    """Train the toy generator (from scratch, or on from ``generator_from``) and ``save_pretrained`` it
    (plus ``pretrain.json``) to ``out_dir``."""
    config = config or PretrainConfig()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    pipe = load_pipeline(config.generator_from) if config.generator_from else build_toy_pipeline(config.generator, seed=config.seed)
    started = time.perf_counter()
    if config.generator_from:
        vae_losses = []
    elif config.vae_from:
        pipe.vae = AutoencoderKL.from_pretrained(str(Path(config.vae_from) / "vae")).eval().requires_grad_(False)
        vae_losses = []
    else:
        vae_losses = train_vae(pipe, config, rng)
    vae_seconds = time.perf_counter() - started
    prompts, images = render_training_images(config.dataset_size, rng, confusion_rate=config.confusion_rate)
    latents = encode_latents(pipe.vae, images_to_tensor(images))
    generator_losses = train_generator(pipe, prompts, latents, config)
    out_dir = Path(out_dir)
    pipe.to(DTYPES[config.save_dtype]).save_pretrained(str(out_dir))
    record = {
        "config": asdict(config),
        "vae_seconds": round(vae_seconds, 1),
        "generator_seconds": round(time.perf_counter() - started - vae_seconds, 1),
        "vae_final_loss": float(np.mean(vae_losses[-50:])) if vae_losses else None,
        "generator_final_loss": float(np.mean(generator_losses[-100:])),
        "torch": torch.__version__,
    }
    (out_dir / "pretrain.json").write_text(json.dumps(record, indent=2))
    return pipe


@torch.no_grad()
def calibrate_vae_normalisation(vae: AutoencoderKL, images: torch.Tensor) -> None:
    """Set ``shift_factor`` / ``scaling_factor`` so the images' latents have zero mean and unit
    variance, the way SD3's constants were chosen for its own VAE. ``images``: (B, 3, H, W) in [0, 1]."""
    latents = vae.encode(images * 2 - 1).latent_dist.mode()
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())
