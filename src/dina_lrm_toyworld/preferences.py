"""Preference data for the toy world: generator samples and controlled corruptions, judged.

Per prompt the generator draws several samples; the judge scores each (and each corrupted render
of the prompt against its clean render). Training pairs are labelled by a Thurstone-noisy rater,
P(a preferred to b) = Phi((score_a - score_b) / s), with s set so that the expected share of
flipped labels equals ``flip_rate`` (human raters disagree on roughly 15-25% of pairs). Test pairs
are labelled by the noise-free judge.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from tqdm import tqdm

from dina_lrm import PairRecord, SD3PromptEncoder
from dina_lrm_toyworld.config import PreferenceDataConfig
from dina_lrm_toyworld.corruptions import DEFECTS, SEMANTIC, add_defect, corrupt_scene
from dina_lrm_toyworld.generator import decode_latents, encode_latents, images_to_tensor
from dina_lrm_toyworld.judge import Judge
from dina_lrm_toyworld.pretrain import UNCONDITIONAL_PROMPT
from dina_lrm_toyworld.scenes import PromptSpec, render, scene_for


@dataclass
class Candidate:
    """One judged image of a prompt: a generator sample, a clean render or a corruption."""

    prompt: str
    latent: torch.Tensor  # (C, H, W) normalised
    image: np.ndarray  # (H, W, 3) uint8
    score: float
    alignment: float
    quality: float
    source: str


@torch.no_grad()
def sample_latents(
    pipe: StableDiffusion3Pipeline,
    prompt_encoder: SD3PromptEncoder,
    prompts: list[str],
    steps: int,
    guidance_scale: float,
    seed: int,
    batch_size: int = 128,
    progress: bool = True,
) -> torch.Tensor:
    """Final clean latents (normalised, the transformer's space) for ``prompts``, with CFG."""
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    negative, negative_pooled = prompt_encoder([UNCONDITIONAL_PROMPT])
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress):
        batch = prompts[start : start + batch_size]
        states, pooled = prompt_encoder(batch)
        chunks.append(
            pipe(
                prompt_embeds=states,
                pooled_prompt_embeds=pooled,
                negative_prompt_embeds=negative.expand(len(batch), -1, -1),
                negative_pooled_prompt_embeds=negative_pooled.expand(len(batch), -1),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=size,
                width=size,
                generator=generator,
                output_type="latent",
            ).images
        )
    return torch.cat(chunks)


def judge_candidates(judge: Judge, prompts: list[str], latents: torch.Tensor, images: np.ndarray, sources: list[str]):
    candidates = []
    for prompt, latent, image, source in zip(prompts, latents, images, sources, strict=True):
        result = judge(image, prompt)
        candidates.append(Candidate(prompt, latent, image, result.score, result.alignment, result.quality, source))
    return candidates


def generated_candidates(pipe, prompt_encoder, judge, specs: list[PromptSpec], config: PreferenceDataConfig, seed: int):
    prompts = [spec.text for spec in specs for _ in range(config.samples_per_prompt)]
    latents = sample_latents(pipe, prompt_encoder, prompts, config.sampling_steps, config.guidance_scale, seed, config.batch_size)
    images = decode_latents(pipe.vae, latents)
    return judge_candidates(judge, prompts, latents, images, ["generated"] * len(prompts))


def corruption_candidates(vae, judge, specs: list[PromptSpec], config: PreferenceDataConfig, seed: int):
    """Per prompt: a clean render, then ``corruptions_per_prompt`` corrupted versions of it."""
    rng = np.random.default_rng(seed)
    prompts, images, sources = [], [], []
    for spec in specs:
        scene = scene_for(spec, rng)
        prompts.append(spec.text)
        images.append(render(scene))
        sources.append("render")
        for _ in range(config.corruptions_per_prompt):
            image, source = corrupted_render(spec, scene, rng)
            prompts.append(spec.text)
            images.append(image)
            sources.append(source)
    latents = encode_latents(vae, images_to_tensor(images))
    round_trip = decode_latents(vae, latents)
    return judge_candidates(judge, prompts, latents, round_trip, sources)


def corrupted_render(spec: PromptSpec, scene, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    while True:
        kind = str(rng.choice(SEMANTIC + DEFECTS))
        if kind in DEFECTS:
            return add_defect(render(scene), kind, rng, strength=float(rng.uniform(0.5, 1.0))), kind
        corrupted = corrupt_scene(spec, scene, kind, rng)
        if corrupted is not None:
            return render(corrupted), kind


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def rater_noise(gaps: np.ndarray, flip_rate: float) -> float:
    """The rater's noise scale s at which the mean of Phi(-|gap| / s) over ``gaps`` is ``flip_rate``."""
    if not 0 <= flip_rate < 0.5:
        raise ValueError(f"flip_rate must be in [0, 0.5), got {flip_rate}")
    if flip_rate == 0:
        return 0.0
    low, high = 1e-6, 1e3
    for _ in range(100):
        middle = math.sqrt(low * high)
        rate = np.mean([_normal_cdf(-abs(g) / middle) for g in gaps])
        low, high = (middle, high) if rate < flip_rate else (low, middle)
    return math.sqrt(low * high)


def candidate_pairs(candidates: list[Candidate], min_gap: float) -> list[tuple[Candidate, Candidate]]:
    """All pairs of candidates of one prompt whose judge scores differ by at least ``min_gap``,
    better first; corruptions pair only with their own clean render."""
    by_prompt: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_prompt.setdefault(candidate.prompt, []).append(candidate)
    pairs = []
    for group in by_prompt.values():
        generated = [c for c in group if c.source == "generated"]
        clean = [c for c in group if c.source == "render"]
        candidates_pairs = list(itertools.combinations(generated, 2))
        candidates_pairs += [(r, c) for r in clean for c in group if c.source not in ("generated", "render")]
        for a, b in candidates_pairs:
            if abs(a.score - b.score) >= min_gap:
                pairs.append((a, b) if a.score > b.score else (b, a))
    return pairs


def label_pairs(
    pairs: list[tuple[Candidate, Candidate]], flip_rate: float, rng: np.random.Generator, prefix: str
) -> tuple[list[PairRecord], float]:
    """Records labelled by the noisy rater, and the share of labels that disagree with the judge."""
    if not pairs:
        raise ValueError("no candidate pairs differ in judge score: nothing to label (is the generator trained?)")
    noise = rater_noise(np.array([a.score - b.score for a, b in pairs]), flip_rate)
    records, flips = [], 0
    for i, (better, worse) in enumerate(pairs):
        flipped = noise > 0 and rng.random() < _normal_cdf(-(better.score - worse.score) / noise)
        chosen, rejected = (worse, better) if flipped else (better, worse)
        flips += flipped
        records.append(
            PairRecord(
                prompt=better.prompt,
                chosen=chosen.latent.numpy(),
                rejected=rejected.latent.numpy(),
                pair_id=f"{prefix}-{i:06d}",
                group_id=better.prompt,
                source=next((c.source for c in (worse, better) if c.source != "render"), "render"),
            )
        )
    return records, flips / max(len(pairs), 1)
